"""Find the data below `data_url`, read it, and build the mindspore.dataset pipelines.

Two layouts are recognised anywhere below the data folder:
- CIFAR-10 binary: `data_batch_*.bin` (train) and `test_batch.bin` (val), records of 1 label byte + 3072 CHW bytes.
  Any whole number of records is accepted (mindspore's Cifar10Dataset insists on exactly 10000).
- ImageFolder: `train/` and `val/` folders of class subfolders (e.g. Canidae: `train|val/dogs|wolves`).
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import UserError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_RATIO = 0.875  # val: resize to image_size / 0.875 (256 for 224), then center crop

CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR_TRAIN_GLOB = "data_batch_*.bin"
CIFAR_VAL_FILE = "test_batch.bin"
CIFAR_META_FILE = "batches.meta.txt"

TRAIN_DIR = "train"
VAL_DIRS = ("val", "validation", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DataSource:
    """What was found below data_url: enough to build both pipelines and to describe the data."""
    kind: str                       # "cifar10-bin" or "imagefolder"
    root: Path                      # the folder that holds the splits
    class_names: list
    train: object                   # cifar: (images NHWC uint8, labels); imagefolder: the train folder
    val: object
    sizes: dict = field(default_factory=dict)

    @property
    def name(self):
        """A readable dataset name (used as the default Aim experiment)."""
        if self.kind == "cifar10-bin":
            return "cifar10"
        return self.root.name if self.root.name not in ("data", "") else self.root.parent.name


# ---------------------------------------------------------------- detection

def find_data(data_url):
    """Detect the layout anywhere below `data_url` and read its metadata."""
    root = Path(data_url)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data_url {root} is not a folder")
    for folder, dirs, files in _walk(root):
        if CIFAR_VAL_FILE in files or any(Path(f).match(CIFAR_TRAIN_GLOB) for f in files):
            return _load_cifar(folder)
        if TRAIN_DIR in dirs:
            return _load_imagefolder(folder)
    raise UserError(f"no dataset found below {root}: expected CIFAR-10 binary files "
                    f"({CIFAR_TRAIN_GLOB}, {CIFAR_VAL_FILE}) or an ImageFolder with train/ and val/ class folders")


def _walk(root):
    """os.walk, breadth first, hidden folders skipped, sorted for a deterministic choice."""
    level = [root]
    while level:
        next_level = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
            files = [e.name for e in entries if e.is_file()]
            yield folder, dirs, files
            next_level += [folder / d for d in dirs]
        level = next_level


# ---------------------------------------------------------------- CIFAR-10 binary

def read_cifar_file(path):
    """Images (N, 32, 32, 3) uint8 and labels (N,) int32 from one CIFAR-10 binary file."""
    size = path.stat().st_size
    if size == 0 or size % CIFAR_RECORD:
        raise UserError(f"{path} is not a CIFAR-10 binary file: {size} bytes is not a whole number of "
                        f"{CIFAR_RECORD}-byte records (truncated download?)")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int32)
    images = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_cifar_split(files):
    parts = [read_cifar_file(f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_cifar(folder):
    train_files = sorted(folder.glob(CIFAR_TRAIN_GLOB))
    val_file = folder / CIFAR_VAL_FILE
    if not train_files:
        raise UserError(f"CIFAR-10 folder {folder} has {CIFAR_VAL_FILE} but no training split ({CIFAR_TRAIN_GLOB})")
    if not val_file.exists():
        raise UserError(f"CIFAR-10 folder {folder} has no validation split ({CIFAR_VAL_FILE})")
    train = _read_cifar_split(train_files)
    val = _read_cifar_split([val_file])
    class_count = int(max(train[1].max(), val[1].max())) + 1
    meta = folder / CIFAR_META_FILE
    names = [line.strip() for line in meta.read_text().splitlines() if line.strip()] if meta.exists() else []
    if len(names) < class_count:
        names += [str(i) for i in range(len(names), class_count)]
    return DataSource("cifar10-bin", folder, names, train, val,
                      sizes={"train": len(train[1]), "val": len(val[1])})


# ---------------------------------------------------------------- ImageFolder

def _class_folders(split):
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def _count_images(folder):
    return sum(1 for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)


def _load_imagefolder(folder):
    train = folder / TRAIN_DIR
    val = next((folder / d for d in VAL_DIRS if (folder / d).is_dir()), None)
    if val is None:
        raise UserError(f"ImageFolder {folder} has train/ but no validation split ({'/, '.join(VAL_DIRS)}/)")
    names = _class_folders(train)
    if not names:
        raise UserError(f"{train} has no class folders")
    val_names = _class_folders(val)
    if val_names != names:
        raise UserError(f"train and val classes differ in {folder}: train has {names}, {val.name} has {val_names}")
    sizes = {"train": _count_images(train), "val": _count_images(val)}
    for split, count in sizes.items():
        if count == 0:
            raise UserError(f"the {split} split of {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return DataSource("imagefolder", folder, names, train, val, sizes=sizes)


# ---------------------------------------------------------------- pipelines

def worker_count(requested):
    """mindspore.dataset refuses more workers than cores."""
    cores = os.cpu_count() or 1
    return max(1, min(requested or cores, cores))


def eval_transforms(image_size, data_format="imagefolder", decode=False):
    """The validation transform for one HWC uint8 image (encoded bytes when `decode`), by the data's format:
    photos (imagefolder) are resized to image_size / 0.875 and centre-cropped; CIFAR images are resized whole.

    Inference uses it too, so a served model sees its input exactly as validation did.
    """
    from mindspore.dataset import vision
    ops = [vision.Decode()] if decode else []
    if data_format == "imagefolder":
        ops += [vision.Resize(round(image_size / CROP_RATIO)), vision.CenterCrop(image_size)]
    else:
        ops += [vision.Resize((image_size, image_size))]
    return ops + _to_tensor()


def _to_tensor():
    from mindspore.dataset import vision
    return [vision.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), vision.HWC2CHW()]


def _transforms(source, image_size, augment):
    from mindspore.dataset import vision
    if not augment:
        return eval_transforms(image_size, source.kind, decode=source.kind == "imagefolder")
    if source.kind == "imagefolder":
        return [vision.RandomCropDecodeResize(image_size, scale=(0.08, 1.0), ratio=(0.75, 1.333)),
                vision.RandomHorizontalFlip(prob=0.5)] + _to_tensor()
    # CIFAR: native-size padded crop, or resized to image_size (e.g. 224 to fine-tune ImageNet weights)
    resize = [] if image_size == CIFAR_SIDE else [vision.Resize((image_size, image_size))]
    return resize + [vision.RandomCrop(image_size, padding=image_size // 8),
                     vision.RandomHorizontalFlip(prob=0.5)] + _to_tensor()


def create_dataset(source, split, image_size, batch_size, workers=None, shuffle=None, shard=None, augment=None,
                   drop_remainder=None):
    """A batched (image, label) pipeline for `split` ("train" or "val").

    Training drops the last partial batch so every step has the same shape (one graph compile, sane BatchNorm).
    `shard` is (num_shards, shard_id) for data parallel runs.
    """
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore.dataset.transforms import TypeCast
    training = split == "train"
    shuffle = training if shuffle is None else shuffle
    augment = training if augment is None else augment
    workers = worker_count(workers)
    sharding = {"num_shards": shard[0], "shard_id": shard[1]} if shard else {}
    data = source.train if training else source.val
    if source.kind == "imagefolder":
        class_indexing = {name: i for i, name in enumerate(source.class_names)}
        dataset = ds.ImageFolderDataset(str(data), class_indexing=class_indexing, decode=False,
                                        extensions=list(IMAGE_EXTENSIONS) + [e.upper() for e in IMAGE_EXTENSIONS],
                                        shuffle=shuffle, num_parallel_workers=workers, **sharding)
    else:
        images, labels = data
        dataset = ds.NumpySlicesDataset({"image": images, "label": labels}, shuffle=shuffle,
                                        num_parallel_workers=1, **sharding)
    dataset = dataset.map(operations=_transforms(source, image_size, augment), input_columns="image",
                          num_parallel_workers=workers)
    dataset = dataset.map(operations=TypeCast(ms.int32), input_columns="label")
    if training and dataset.get_dataset_size() < batch_size:
        raise UserError(f"the training split has {dataset.get_dataset_size()} images, fewer than "
                        f"--batch_size {batch_size}")
    return dataset.batch(batch_size, drop_remainder=training if drop_remainder is None else drop_remainder)


def preview_batch(source, split, image_size, count=16):
    """The first `count` images of a split, without augmentation: (HWC uint8 for display, the network's NCHW
    float32 input, labels)."""
    count = min(count, source.sizes[split])
    data = create_dataset(source, split, image_size, batch_size=count, workers=1, shuffle=False, augment=False)
    inputs, labels = next(data.create_tuple_iterator(output_numpy=True))
    display = inputs.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(display.round(), 0, 255).astype(np.uint8), inputs, labels
