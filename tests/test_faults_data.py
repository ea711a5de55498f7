"""The fault catalogue's data family (issue 16): symlink loops, unreadable images, decompression bombs, silent wrong
data and small data in fixed-feature mode. Each case runs train.py in a fresh process from an empty working folder
and checks the exit code, the one `error:` line or the named warning, no traceback, the deadline, the peak memory,
that an earlier run's outputs and the data are byte-identical after, and that nothing was written where it ran."""
import io
import json
import os
import struct
import time
import zlib

import pytest
from conftest import assert_fails_cleanly, assert_warns_and_goes_on, run_train, snapshot
from PIL import Image

from make_demo_data import make_split, write_cifar, write_imagefolder

QUICK = ["--arch", "resnet18", "--image_size", 32, "--epochs", 1, "--batch_size", 8, "--num_workers", 1,
         "--aim_system_metrics", "false"]
FAILS, TRAINS = 60, 180  # deadlines (s): a case that stops before training, and one that trains an epoch
PEAK_RSS_LIMIT = 2_500_000  # KB: the job itself takes about 1.2 GB; a 20000x20000 bomb decoded needs 1.2 GB more
# The job's own peak (VmHWM, kB): ru_maxrss would carry the peak of the process that started it across exec, and
# the pytest worker that starts it may itself hold gigabytes.
PEAK_RSS_HOOK = """import atexit, os
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return line.split()[1]
atexit.register(lambda: open(os.environ["PEAK_RSS_FILE"], "w").write(_peak()))
"""


def imagefolder(tmp, train=16, val=8):
    return write_imagefolder(tmp / "data", {"train": make_split(train, 2, 0), "val": make_split(val, 2, 1)},
                             ["dogs", "wolves"])


def bomb_png(path, width=20000, height=20000):
    """A real PNG of black 1-bit pixels: 50 KB on disk, 400 million pixels (1.2 GB as RGB) decoded."""
    row = bytes(1 + (width + 7) // 8)  # the filter byte, then the packed bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def jpeg_bytes(png):
    buffer = io.BytesIO()
    Image.open(png).save(buffer, "JPEG")
    return buffer.getvalue()


def unreadable(split, how):
    """Add to `split` one file that cannot be read, broken `how`."""
    good = sorted((split / "dogs").glob("*.png"))[0]
    broken = {"empty": ("empty.jpg", b""), "text": ("notes.png", b"not an image\n"),
              "cut png": ("cut.png", good.read_bytes()[:300]), "cut jpeg": ("cut.jpg", jpeg_bytes(good)[:400])}
    name, data = broken[how]
    (split / "wolves" / name).write_bytes(data)


# ---------------------------------------------------------------- the cases' data

def symlink_loops_only(tmp):
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    (data / "readme.txt").write_text("no images here")
    for link, target in (("here", "."), ("up", ".."), ("sub/back", "..")):
        os.symlink(target, data / link)
    return [data]


def symlink_loops_and_a_symlinked_class(tmp):
    """An ImageFolder whose wolves/ folders are links to another disk's folders, with loops beside them."""
    data = imagefolder(tmp)
    for split in ("train", "val"):
        (data / split / "wolves").rename(tmp / f"{split}-wolves")
        os.symlink(tmp / f"{split}-wolves", data / split / "wolves")
        os.symlink("..", data / split / "wolves-up")
    os.symlink(".", data / "here")
    return [data]


def unreadable_in_both_splits(tmp):
    """Four broken files in train, one in val, and an animated GIF, which trains on its first frame."""
    data = imagefolder(tmp)
    for how in ("empty", "text", "cut png", "cut jpeg"):
        unreadable(data / "train", how)
    unreadable(data / "val", "empty")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    frames[0].save(data / "train" / "dogs" / "moving.gif", save_all=True, append_images=frames[1:], loop=0)
    return [data]


def mostly_unreadable_val(tmp):
    data = imagefolder(tmp, val=2)
    for how in ("empty", "text", "cut png"):
        unreadable(data / "val", how)
    return [data]


def unreadable_train(tmp):
    data = imagefolder(tmp)
    for path in (data / "train").rglob("*.png"):
        path.write_bytes(path.read_bytes()[:100])
    return [data]


def bomb_in_train(tmp):
    data = imagefolder(tmp)
    bomb_png(data / "train" / "dogs" / "huge.png")
    return [data]


def bomb_as_val(tmp):
    data = imagefolder(tmp, val=2)
    for path in (data / "val").rglob("*.png"):
        bomb_png(path)
    return [data]


def cifar(tmp, names=("a", "b"), train_label=None, val_label=None):
    train, val = make_split(40, 2, 0), make_split(10, 2, 1)
    for labels, label in ((train[1], train_label), (val[1], val_label)):
        if label is not None:
            labels[3] = label
    folder = write_cifar(tmp / "cifar", train, val, list(names))
    if not names:
        (folder / "batches.meta.txt").unlink()
    return [folder]


def outputs_inside_a_class(tmp):
    """A previous run wrote its outputs into a class folder (`--output_url data/train/dogs/run1`)."""
    data = imagefolder(tmp)
    run = data / "train" / "dogs" / "run1"
    (run / "examples").mkdir(parents=True)
    (run / "labels.json").write_text('{"class_names": ["dogs", "wolves"]}\n')
    (run / "resnet18-best.ckpt").write_bytes(b"weights")
    for name in ("curves.png", "train_samples.png", "examples/dogs.png", "examples/wolves.png"):
        Image.new("RGB", (32, 32)).save(run / name)
    return [data]


def resnet18_weights(tmp):
    import mindspore as ms
    from resnet import create_model
    ms.save_checkpoint(create_model("resnet18", 2), str(tmp / "resnet18.ckpt"))
    return tmp / "resnet18.ckpt"


def frozen(train, *flags, pretrained=False):
    """Fixed-feature mode on `train` training images (from scratch, it warns: the needle of a job that goes on)."""
    return lambda tmp: [imagefolder(tmp, train=train), "--freeze", *flags,
                        *(["--pretrain_url", resnet18_weights(tmp)] if pretrained else [])]


# name: (data and flags (tmp) -> argv, needle, deadline, the `data:` line's counts when the job goes on)
CASES = {
    "symlink loops, no data": (symlink_loops_only, "no dataset found", FAILS, None),
    "symlink loops beside a symlinked class": (symlink_loops_and_a_symlinked_class, "(a loop)", TRAINS,
                                               "16 train / 8 val"),
    "unreadable images in both splits": (unreadable_in_both_splits, "skipping 5 image file(s)", TRAINS,
                                         "17 train / 8 val"),
    "val split mostly unreadable": (mostly_unreadable_val, "3 of the 5 images in the val split", FAILS, None),
    "every training image cut short": (unreadable_train, "16 of the 16 images in the train split", FAILS, None),
    "decompression bomb in train": (bomb_in_train, "decompression bomb", TRAINS, "16 train / 8 val"),
    "decompression bomb as the val split": (bomb_as_val, "decompression bomb", FAILS, None),
    "CIFAR train label beyond the names": (lambda t: cifar(t, train_label=200), "holds label 200", FAILS, None),
    "CIFAR val label beyond the names": (lambda t: cifar(t, val_label=2), "test_batch.bin holds label 2", FAILS,
                                         None),
    "CIFAR label 200 without names": (lambda t: cifar(t, names=(), train_label=200), "holds label 200", FAILS,
                                      None),
    "earlier outputs inside a class folder": (outputs_inside_a_class, "training job's outputs", TRAINS,
                                              "16 train / 8 val"),
    "--freeze, 20 images, --batch_size 8": (frozen(20), "--freeze without --pretrain_url", TRAINS,
                                            "20 train / 8 val"),
    "--freeze, tutorial way, 20 images, --batch_size 24": (frozen(20, "--feature_cache", "off", "--batch_size", 24,
                                                                  pretrained=True),
                                                           "fewer than --batch_size 24", FAILS, None),
}


@pytest.fixture
def earlier_run(tmp_path):
    """An output folder holding a finished run's records, which a failed run must leave alone."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "labels.json").write_text('{"class_names": ["x", "y"]}\n')
    (folder / "metrics.json").write_text('[{"epoch": 1, "val_accuracy": 0.5}]\n')
    return folder


@pytest.mark.parametrize("case", [pytest.param(name, marks=[pytest.mark.slow] if CASES[name][3] else [])
                                  for name in sorted(CASES)])  # the cases that train an epoch are slow
def test_data_fault(case, tmp_path, earlier_run):
    build, needle, deadline, counts = CASES[case]
    argv = build(tmp_path)
    data, cwd, hook = argv[0], tmp_path / "cwd", tmp_path / "hook"
    for folder in (cwd, hook, tmp_path / "cache"):
        folder.mkdir()
    (hook / "sitecustomize.py").write_text(PEAK_RSS_HOOK)
    out = tmp_path / "new" if counts else earlier_run  # a job that goes on writes a new run's outputs
    before = snapshot(earlier_run), snapshot(data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
           "PEAK_RSS_FILE": str(tmp_path / "peak")}
    start = time.monotonic()
    result = run_train("--data_url", data, "--output_url", out, "--cache_dir", tmp_path / "cache", "--overwrite",
                       *QUICK, *argv[1:], timeout=deadline + 30, cwd=cwd, env=env)  # the case's flags win
    took = time.monotonic() - start
    if counts:
        assert_warns_and_goes_on(result, needle)
        assert f"{counts} images" in result.stdout, result.stdout
        assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [1]
    else:
        assert_fails_cleanly(result, needle)
    assert took < deadline, f"{case} took {took:.0f} s"
    assert int((tmp_path / "peak").read_text()) < PEAK_RSS_LIMIT
    assert (snapshot(earlier_run), snapshot(data)) == before
    assert not list(cwd.iterdir())
