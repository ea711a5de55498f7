"""Fixed-feature training: cached backbone features (`--freeze`) against the seed tutorial's way (the frozen ResNet
run on every image every step, validation after every epoch: `--freeze --feature_cache off`).

    .venv/bin/python bench/fixed_feature.py            # ResNet50 at 224, 120 train / 60 val images, 10 epochs

Both runs are the real train.py on the same data from the same starting weights (a ResNet50 briefly trained here
at 32x32, since nothing is downloaded). It prints each run's wall time, its training time (the feature pass plus
every epoch with its validation, from metrics.json and the log) and best validation accuracy, the time ratios and
the accuracy difference.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train" / "train_dir" / "train.py"
sys.path.insert(0, str(ROOT / "train"))

from make_demo_data import make_demo_data  # noqa: E402


def train(*args):
    """Runs train.py; returns (seconds, best val accuracy, its stdout)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(TRAIN), *map(str, args), "--aim_system_metrics", "false"],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: train.py failed: {result.stderr.strip().splitlines()[-1:]}")
    best = re.search(r"best val_accuracy ([0-9.]+)", result.stdout)
    return seconds, float(best.group(1)), result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="resnet50")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pretrain_data, _ = make_demo_data(tmp / "pretrain", 960, 200, num_classes=6, seed=10)
        data, _ = make_demo_data(tmp / "data", args.train, args.val, num_classes=4, seed=20)
        print(f"pretraining {args.arch} at 32x32 on 960 images for the starting weights ...", flush=True)
        train("--data_url", pretrain_data, "--output_url", tmp / "pretrained", "--arch", args.arch,
              "--image_size", 32, "--batch_size", 32, "--epochs", 4, "--lr", 0.02, "--warmup_epochs", 1)
        weights = tmp / "pretrained" / f"{args.arch}-best.ckpt"
        common = ["--data_url", data, "--pretrain_url", weights, "--arch", args.arch, "--image_size",
                  args.image_size, "--epochs", args.epochs, "--batch_size", 16, "--lr", 0.05, "--freeze"]
        runs = {}
        for name, extra in (("seed tutorial's way (--feature_cache off)", ["--feature_cache", "off"]),
                            ("cached features (--freeze)", [])):
            print(f"running: {name} ...", flush=True)
            out = tmp / f"out-{len(runs)}"
            seconds, accuracy, stdout = train(*common, *extra, "--output_url", out)
            extraction = re.search(r"computed once by the frozen backbone in ([0-9.]+) s", stdout)
            epochs = sum(r["seconds"] for r in json.loads((out / "metrics.json").read_text()))
            runs[name] = (seconds, epochs + (float(extraction.group(1)) if extraction else 0.0), accuracy)

    print(f"\nfixed-feature training, {args.arch} at {args.image_size}x{args.image_size}, {args.train} train / "
          f"{args.val} val images, {args.epochs} epochs, batch 16")
    print(f"{'run':<44}{'whole run s':>12}{'training s':>12}{'best val acc':>14}")
    for name, (seconds, training, accuracy) in runs.items():
        print(f"{name:<44}{seconds:>12.1f}{training:>12.1f}{accuracy:>14.3f}")
    (slow, slow_training, slow_acc), (fast, fast_training, fast_acc) = runs.values()
    print(f"ratio tutorial/cached: {slow / fast:.1f}x for the whole run (start-up, export and Aim included), "
          f"{slow_training / fast_training:.1f}x for training (the feature pass and all epochs with their "
          f"validation); accuracy difference {100 * (fast_acc - slow_acc):+.1f} points")


if __name__ == "__main__":
    main()
