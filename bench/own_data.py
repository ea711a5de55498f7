"""Own data at scale: finding and splitting class folders of 20k and 200k files, and batch prediction against the
app's one-image-at-a-time Predictor.

    .venv/bin/python bench/own_data.py                          # 20k and 200k files; predict.py on 768 photos
    .venv/bin/python bench/own_data.py --files 5000 --photos 64 # quicker

Detection: class folders with no split (the layout that also needs the stratified split), each file a tiny PNG, so
that what is measured is the walk, the split and the per-file check, not decoding big images. Each size runs
`datasets.find_data` in a fresh process, after `os.walk` over the same tree in that process as the reference (the
least any detection can do); printed: both times and their ratio, and the process's peak memory above what it held
after its imports, per file. "Flat" means the bytes per file stay the same from 20k to 200k.

Prediction: predict.py (batched through the data pipeline) and inference/predictor.py's Predictor called once per
image, on the same 500x375 JPEGs, with the same untrained ResNet50 (speed does not depend on the weights); the ratio
of their images/s, and whether their top-1 labels agree on every image.
"""
import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speed import ROOT, TRAIN_DIR, peak_rss_mb, untrained_model  # noqa: E402  (puts train_dir on the path)

CLASSES = 10


def tiny_pngs(classes):
    """One 8x8 PNG per class (a colour each), as bytes."""
    from PIL import Image
    out = []
    for label in range(classes):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (25 * label, 255 - 25 * label, 128)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def class_folders(root, files, classes=CLASSES):
    """`files` tiny images spread over `classes` class folders, no split."""
    pngs = tiny_pngs(classes)
    for label in range(classes):
        (root / f"class_{label}").mkdir(parents=True)
    for i in range(files):
        (root / f"class_{i % classes}" / f"{i:07d}.png").write_bytes(pngs[i % classes])
    return root


def find_in_child(root):
    """Runs in a fresh process: os.walk, then find_data, over `root`."""
    import datasets
    baseline = peak_rss_mb()
    start = time.perf_counter()
    listed = sum(len(files) for _, _, files in os.walk(root))
    walk = time.perf_counter() - start
    start = time.perf_counter()
    source = datasets.find_data(root, log=lambda message: None)
    find = time.perf_counter() - start
    assert source.sizes["train"] + source.sizes["val"] == listed, (source.sizes, listed)
    return {"files": listed, "walk_s": walk, "find_s": find, "baseline_mb": baseline, "peak_mb": peak_rss_mb(),
            "val": source.sizes["val"]}


def measure_find(root):
    result = subprocess.run([sys.executable, __file__, "--child-find", str(root)], capture_output=True, text=True,
                            env={**os.environ, "GLOG_v": "3"})
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"the find_data child failed:\n{result.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def photos(folder, count, seed=0):
    """`count` 500x375 JPEGs of smooth random colour (decoding cost like a photo's, unlike noise)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        small.resize((500, 375), Image.BILINEAR).save(folder / f"photo_{i:05d}.jpg", quality=90)
    return sorted(folder.iterdir())


def predict_job(model_dir, images_dir, out, batch_size):
    """predict.py as a user runs it; its own images/s (the prediction loop, without start-up and model load)."""
    result = subprocess.run([sys.executable, str(TRAIN_DIR / "predict.py"), "--model_url", str(model_dir),
                             "--data_url", str(images_dir), "--output_url", str(out), "--batch_size", str(batch_size)],
                            capture_output=True, text=True, env={**os.environ, "GLOG_v": "3"})
    rates = re.findall(r"predict: \d+/\d+ images, ([\d.]+) images/s", result.stdout)
    if result.returncode or not rates:
        sys.exit(f"predict.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    with open(out / "predictions.csv", newline="") as table:
        return float(rates[-1]), {row["path"]: row["label_1"] for row in csv.DictReader(table)}


def predictor_one_by_one(model_dir, paths):
    sys.path.insert(0, str(ROOT / "inference"))
    from predictor import Predictor
    predictor = Predictor.load(sorted(model_dir.glob("*best.ckpt"))[0])
    predictor.predict(paths[:1])  # graph compile
    start = time.perf_counter()
    labels = {path.name: predictor.predict([path], top_k=1)[0][0][0] for path in paths}
    return len(paths) / (time.perf_counter() - start), labels


def memory_folder(needed=2 * 2**30):
    """/dev/shm when it can hold 200k small files (4 KiB each at least), else None: the system's temporary folder."""
    try:
        free = os.statvfs("/dev/shm")
        return "/dev/shm" if free.f_bavail * free.f_frsize >= needed else None
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--photos", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tmp", default=memory_folder(),
                        help="where the files are made (default: /dev/shm when it has 2 GB free: a disk that "
                             "throttles writing 200k small files would measure the disk)")
    parser.add_argument("--child-find", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_find:
        print("RESULT " + json.dumps(find_in_child(args.child_find)), flush=True)
        return

    print(f"own data at scale ({os.cpu_count()} cores)")
    print(f"{'class-folder files':>18}{'os.walk s':>11}{'find_data s':>13}{'ratio':>7}{'peak MB above imports':>23}"
          f"{'bytes/file':>12}")
    for count in args.files:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            row = measure_find(class_folders(Path(tmp) / "data", count))
        above = row["peak_mb"] - row["baseline_mb"]
        print(f"{row['files']:>18}{row['walk_s']:>11.2f}{row['find_s']:>13.2f}{row['find_s'] / row['walk_s']:>7.1f}"
              f"{above:>23.1f}{above * 2**20 / row['files']:>12.0f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        model = untrained_model(tmp / "model", image_size=args.image_size, num_classes=CLASSES)
        paths = photos(tmp / "photos", args.photos)
        batched, batched_labels = predict_job(model, tmp / "photos", tmp / "out", args.batch_size)
        single, single_labels = predictor_one_by_one(model, paths)
    agree = sum(batched_labels.get(name) == label for name, label in single_labels.items())
    print(f"\nprediction, ResNet50 {args.image_size}x{args.image_size}, {args.photos} 500x375 JPEGs:")
    print(f"  predict.py (batch {args.batch_size}): {batched:.1f} images/s; Predictor one at a time: {single:.1f} "
          f"images/s; ratio {batched / single:.2f}; top-1 agrees on {agree}/{len(paths)}")


if __name__ == "__main__":
    main()
