"""Serving speed, end to end: a JPEG decoded, prepared and classified by the Predictor (.onnx, .ckpt, .mindir), and
the app's throughput under concurrent requests. The network alone, against PyTorch: bench/speed.py --only inference.

    .venv/bin/python bench/inference.py                       # an untrained ResNet50 at 224 (weights do not matter)
    .venv/bin/python bench/inference.py --model-dir OUT       # the model a training run wrote

Everything is measured in this one invocation and printed as ratios too, because absolute times on a shared machine
are noise: each path's latency against the .onnx's, and the app's requests/s against the predictor's own sequential
rate.
"""
import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "inference"))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # as train.py does: MindSpore's oneDNN is slow on AVX-512

from predictor import Predictor  # noqa: E402  (also puts train/train_dir on the path)
from speed import call_times, percentiles, untrained_model  # noqa: E402


def app_throughput(model, image_path, requests, concurrency):
    """Requests/s and per-request latency when `concurrency` clients call the running app's /predict."""
    from gradio_client import Client, handle_file
    from launch import running_app
    with running_app(["--model", model]) as (url, client):
        client.predict(handle_file(str(image_path)), api_name="/predict")  # warm up

        clients = threading.local()  # a client per concurrent user: one shared Client races with itself

        def one(_):
            if not hasattr(clients, "client"):
                clients.client = Client(url, verbose=False)
            start = time.perf_counter()
            clients.client.predict(handle_file(str(image_path)), api_name="/predict")
            return time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            times = list(pool.map(one, range(requests)))
        return requests / (time.perf_counter() - start), times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a training run's output folder (default: untrained model)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or untrained_model(Path(tmp), args.arch, args.image_size, 10)
        models = {suffix: found[0] for suffix in ("onnx", "ckpt", "mindir")
                  if (found := sorted(folder.glob(f"*best.{suffix}")))}
        if "onnx" not in models:
            sys.exit(f"error: no *best.onnx in {folder}: train with --export_onnx true (the app is measured on it)")
        image_path = Path(tmp) / "photo.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image_path)

        rows = {}
        for name, path in models.items():
            predictor = Predictor.load(path)
            rows[name] = call_times(lambda: predictor.predict([image_path]), args.repeats)
        rate, app_times = app_throughput(models["onnx"], image_path, args.requests, args.concurrency)

    print(f"inference at batch 1, {args.arch} {args.image_size}x{args.image_size}, a 640x480 JPEG per request "
          f"({os.cpu_count()} cores, {args.repeats} repeats)")
    print(f"{'path':<28}{'p50 ms':>10}{'p95 ms':>10}")
    for name, times in rows.items():
        p50, p95 = percentiles(times)
        print(f"{name:<28}{p50:>10.1f}{p95:>10.1f}")
    p50, p95 = percentiles(app_times)
    print(f"{f'app (onnx), {args.concurrency} concurrent':<28}{p50:>10.1f}{p95:>10.1f}   {rate:.1f} requests/s")
    for name in ("ckpt", "mindir"):
        print(f"ratio {name}/onnx p50: {percentiles(rows[name])[0] / percentiles(rows['onnx'])[0]:.2f}")
    sequential = 1 / statistics.median(rows["onnx"])
    print(f"ratio app requests/s / predictor's sequential images/s: {rate / sequential:.2f}")


if __name__ == "__main__":
    main()
