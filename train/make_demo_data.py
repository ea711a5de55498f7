"""Write a small, learnable image dataset in both layouts train.py reads, with no network access.

Each class is a colour-and-shape pair (red circle, blue square, red square, blue circle, ...), drawn at a random
place, size and shade on a noisy background. Neither colour nor shape alone tells the classes apart, so a network
has something real to learn, and its accuracy rises over a few epochs rather than in the first few steps.

    python train/make_demo_data.py --out demo/data --train 1600 --val 400

writes `OUT/cifar-10-batches-bin/` (data_batch_1.bin, test_batch.bin, batches.meta.txt) and
`OUT/shapes/train|val/<class>/*.png`.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 50, 40), "blue": (50, 80, 220)}
CLASSES = tuple((f"{colour}_{shape}", COLOURS[colour]) for colour, shape in (  # any first N need colour and shape
    ("red", "circle"), ("blue", "square"), ("red", "square"), ("blue", "circle"),
    ("red", "triangle"), ("blue", "triangle"), ("red", "cross"), ("blue", "cross")))
SIDE = 32


def draw_shape(draw, kind, box, colour):
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif kind == "cross":
        w = max(2, r / 2.5)
        draw.rectangle((cx - w, y0, cx + w, y1), fill=colour)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=colour)


def make_image(rng, label, side=SIDE):
    """One HWC uint8 image of class `label`."""
    name, colour = CLASSES[label]
    background = rng.integers(0, 90, size=3)
    pixels = np.clip(background + rng.normal(0, 18, size=(side, side, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    size = rng.uniform(0.35, 0.75) * side
    x0, y0 = rng.uniform(0, side - size, size=2)
    shade = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in colour)
    draw_shape(ImageDraw.Draw(image), name.split("_")[1], (x0, y0, x0 + size, y0 + size), shade)
    return np.asarray(image)


def make_split(count, num_classes, seed, side=SIDE):
    """Balanced images (N, side, side, 3) uint8 and labels (N,) int, in shuffled order."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % num_classes)
    images = np.stack([make_image(rng, int(label), side) for label in labels])
    return images, labels


def write_cifar_file(path, images, labels):
    """CIFAR-10 binary records: 1 label byte, then 3072 bytes of the image in CHW order."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], chw], axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    records.astype(np.uint8).tofile(path)


def write_cifar(folder, train, val, class_names):
    folder = Path(folder)
    write_cifar_file(folder / "data_batch_1.bin", *train)
    write_cifar_file(folder / "test_batch.bin", *val)
    (folder / "batches.meta.txt").write_text("\n".join(class_names) + "\n")
    return folder


def write_imagefolder(folder, splits, class_names):
    """`splits` maps a split name (train, val) to (images, labels); one PNG per image under split/class/."""
    folder = Path(folder)
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            target = folder / split / class_names[label] / f"{i:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target)
    return folder


def make_demo_data(out, train=1600, val=400, num_classes=6, seed=0, side=SIDE):
    out = Path(out)
    names = [name for name, _ in CLASSES[:num_classes]]
    train_split = make_split(train, num_classes, seed, side)
    val_split = make_split(val, num_classes, seed + 1, side)
    cifar = write_cifar(out / "cifar-10-batches-bin", train_split, val_split, names) if side == SIDE else None
    folder = write_imagefolder(out / "shapes", {"train": train_split, "val": val_split}, names)
    return cifar, folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo/data")
    parser.add_argument("--train", type=int, default=1600, help="training images")
    parser.add_argument("--val", type=int, default=400, help="validation images")
    parser.add_argument("--classes", type=int, default=6, choices=range(2, len(CLASSES) + 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cifar, folder = make_demo_data(args.out, args.train, args.val, args.classes, args.seed)
    print(f"demo data: {args.train} train / {args.val} val images of {args.classes} classes in {cifar} and {folder}")


if __name__ == "__main__":
    main()
