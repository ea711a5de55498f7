"""Data-parallel scaling: training images/s with 1 worker and with N msrun workers, on the same data and global batch.

    .venv/bin/python bench/data_parallel.py [--workers 2]

Each run is the real train.py (under msrun for N > 1). The figure is the training steps' throughput of the whole
job (one worker's images/s from metrics.json, times the workers), from the last epoch, so compilation is not in it.
On a machine with fewer cores than workers x the cores one worker uses, the ratio cannot exceed 1.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train" / "train_dir" / "train.py"
sys.path.insert(0, str(ROOT / "train"))

from make_demo_data import make_demo_data  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workers, data, out, batch, args):
    argv = [str(TRAIN), "--data_url", str(data), "--output_url", str(out), "--arch", args.arch, "--image_size",
            str(args.image_size), "--epochs", str(args.epochs), "--batch_size", str(batch), "--aim_system_metrics",
            "false", "--cache_dir", str(out.parent / f"cache-{workers}")]
    bin_dir = Path(sys.executable).parent
    if workers == 1:
        command = [sys.executable, *argv]
    else:
        command = [str(bin_dir / "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
                   f"--master_port={free_port()}", f"--log_dir={out.parent / 'logs'}", "--join=True", *argv]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the {workers}-worker run failed: {result.stderr.strip().splitlines()[-1:]}")
    last = json.loads((out / "metrics.json").read_text())[-1]
    return last["images_per_second"] * workers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, _ = make_demo_data(tmp / "data", 640, 64, num_classes=4)
        single = run(1, data, tmp / "one" / "out", args.global_batch, args)
        parallel = run(args.workers, data, tmp / "many" / "out", args.global_batch // args.workers, args)
    print(f"data-parallel training, {args.arch} at {args.image_size}x{args.image_size}, global batch "
          f"{args.global_batch}, {os.cpu_count()} cores")
    print(f"1 worker: {single:.1f} images/s; {args.workers} workers: {parallel:.1f} images/s; "
          f"ratio {parallel / single:.2f}")


if __name__ == "__main__":
    main()
