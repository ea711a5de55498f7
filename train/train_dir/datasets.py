"""Find the data below `data_url`, read it, and build the mindspore.dataset pipelines.

Four layouts are recognised anywhere below the data folder:
- CIFAR-10 binary: `data_batch_*.bin` (train) and `test_batch.bin` (val), records of 1 label byte + 3072 CHW bytes.
  Any whole number of records is accepted (mindspore's Cifar10Dataset insists on exactly 10000).
- ImageFolder: `train/` and `val/` folders of class subfolders (e.g. Canidae: `train|val/dogs|wolves`).
- Class folders alone (one folder of images per class, no split), or a flat folder of images with a CSV of file
  name and label (Kaggle's form): split into train and val stratified by class and seeded; the split is kept
  (split.json) so that a resumed or later run validates on the same images.
Every image file is checked before training; those that cannot be read are skipped with one warning.
Symlinked folders are followed once each, never round a loop; a folder holding a training job's outputs is no data.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import images
from errors import UserError
from folders import Walker, named, warn

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_RATIO = 0.875  # val: resize to image_size / 0.875 (256 for 224), then center crop
# The label of the rows that fill a last short batch up to the batch size (create_dataset's `pad_last_batch`):
# nn.CrossEntropyLoss's ignore_index, so they add nothing to a loss, and the metrics leave them out.
PADDING_LABEL = -100

CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR_TRAIN_GLOB = "data_batch_*.bin"
CIFAR_VAL_FILE = "test_batch.bin"
CIFAR_META_FILE = "batches.meta.txt"

TRAIN_DIR = "train"
VAL_DIRS = ("val", "validation")
TEST_DIR = "test"  # kept apart for one evaluation at the end; the validation split when there is no val/
IMAGE_EXTENSIONS = images.EXTENSIONS


@dataclass
class DataSource:
    """What was found below data_url: enough to build both pipelines and to describe the data."""
    kind: str                       # "cifar10-bin" or "imagefolder"
    root: Path                      # the folder that holds the splits
    class_names: list
    train: object                   # cifar: (images NHWC uint8, labels); imagefolder: [(image path, label)]
    val: object
    sizes: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # [(path, why)] of the image files that cannot be read
    split: dict = None              # class folders: how they were split (split.json), to be kept with the outputs
    test: object = None             # imagefolder: [(image path, label)] of test/, when val/ is there too
    val_name: str = "val"           # the folder validated on ("test" when there is no val/)

    def class_counts(self, splits=("train", "val")):
        """Images per class in `splits` (both by default)."""
        parts = [getattr(self, split) for split in splits]
        labels = [label for part in parts
                  for label in (part[1] if self.kind == "cifar10-bin" else [label for _, label in part])]
        return np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(self.class_names)).tolist()

    @property
    def name(self):
        """A readable dataset name (used as the default Aim experiment)."""
        if self.kind == "cifar10-bin":
            return "cifar10"
        return self.root.name if self.root.name not in ("data", "") else self.root.parent.name


@dataclass
class SplitPlan:
    """How class folders without a split are split: `fraction` of each class to validation, shuffled by `seed`,
    unless `saved` (the split.json of an earlier run) says which file goes where."""
    fraction: float = 0.2
    seed: int = 1
    saved: dict = None


def find_data(data_url, exclude=(), log=warn, split=SplitPlan()):
    """Detect the layout anywhere below `data_url` and read its metadata. `exclude`: folders that are not data
    (the job's own output folder); what was skipped is reported through `log` once the data is found. `split`:
    how class folders without a split are split."""
    root = Path(data_url)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data_url {root} is not a folder")
    walker = Walker(exclude)
    for folder, dirs, files in walker.walk(root, note_outputs=False):  # only data folders matter
        if CIFAR_VAL_FILE in files or any(Path(f).match(CIFAR_TRAIN_GLOB) for f in files):
            source = _load_cifar(folder)
            break
        if TRAIN_DIR in dirs:
            source = _load_imagefolder(folder, walker)
            break
        table = _labels_csv(folder, files)
        if table is not None:
            source = _load_labelled_images(folder, table, split, log)
            break
        classes = [name for name in dirs if _holds_images(folder / name)]
        if len(classes) >= 2:
            source = _load_class_folders(folder, classes, walker, split, log)
            break
    else:
        raise UserError(f"no dataset found below {root}: expected CIFAR-10 binary files "
                        f"({CIFAR_TRAIN_GLOB}, {CIFAR_VAL_FILE}), an ImageFolder with train/ and val/ class "
                        f"folders, two or more class folders of images, or images with a CSV of file name and "
                        f"label")
    walker.report(log)
    if source.skipped:
        log(f"skipping {len(source.skipped)} image file(s) in {source.root} that cannot be read: "
            f"{named([f'{path.relative_to(source.root)} ({why})' for path, why in source.skipped])}")
    return source


# ---------------------------------------------------------------- CIFAR-10 binary

def read_cifar_file(path):
    """Images (N, 32, 32, 3) uint8 and labels (N,) int32 from one CIFAR-10 binary file."""
    size = path.stat().st_size
    if size == 0 or size % CIFAR_RECORD:
        raise UserError(f"{path} is not a CIFAR-10 binary file: {size} bytes is not a whole number of "
                        f"{CIFAR_RECORD}-byte records (truncated download?)")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int32)
    pixels = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), labels


def _check_cifar_labels(labels, names, meta):
    """Every label byte (`labels`: file -> labels) names a class: one beyond `names` (or, without a names file, a
    class that no training record has) is a corrupt record, which would otherwise silently add classes."""
    named_by = f"{meta} names {len(names)} classes"
    if not names:
        present = set(np.concatenate([y for f, y in labels.items() if f.name != CIFAR_VAL_FILE]).tolist())
        names = [str(i) for i in range(max(present) + 1)]
        missing = sorted(set(range(len(names))) - present)
        if missing:
            high = next(f for f, y in labels.items() if y.max() == len(names) - 1)
            raise UserError(f"{high} holds label {len(names) - 1}, but no training record has label {missing[0]} "
                            f"({len(missing)} unused labels below it): a corrupt record? Name the classes in {meta}")
        named_by = f"the training records have {len(names)} classes (no {meta.name})"
    for path, found in labels.items():
        beyond = np.flatnonzero(found >= len(names))
        if beyond.size:
            raise UserError(f"{path} holds label {found[beyond[0]]} (record {beyond[0]}), but {named_by}, labels "
                            f"0-{len(names) - 1}: a corrupt record?")
    return names


def _load_cifar(folder):
    train_files = sorted(folder.glob(CIFAR_TRAIN_GLOB))
    val_file = folder / CIFAR_VAL_FILE
    if not train_files:
        raise UserError(f"CIFAR-10 folder {folder} has {CIFAR_VAL_FILE} but no training split ({CIFAR_TRAIN_GLOB})")
    if not val_file.exists():
        raise UserError(f"CIFAR-10 folder {folder} has no validation split ({CIFAR_VAL_FILE})")
    parts = {f: read_cifar_file(f) for f in train_files + [val_file]}
    meta = folder / CIFAR_META_FILE
    names = [line.strip() for line in meta.read_text().splitlines() if line.strip()] if meta.exists() else []
    names = _check_cifar_labels({f: labels for f, (_, labels) in parts.items()}, names, meta)
    train = tuple(np.concatenate(column) for column in zip(*(parts[f] for f in train_files)))
    return DataSource("cifar10-bin", folder, names, train, parts[val_file],
                      sizes={"train": len(train[1]), "val": len(parts[val_file][1])})


# ---------------------------------------------------------------- ImageFolder

def _image_files(split, names, walker):
    """[(path, label)] of every image below each class folder of `split`, in class order; a file reached twice
    (a link from one class folder into another) counts once, in the first class that holds it."""
    seen, items = set(), []
    for label, name in enumerate(names):
        for path, real in walker.files(split / name, IMAGE_EXTENSIONS, real=True):
            if real not in seen:
                seen.add(real)
                items.append((path, label))
    return items


def _readable(folder, splits):
    """`splits` (name -> [(path, label)]) without the files that cannot be read, and [(path, why)] of those. A
    split that is mostly unreadable is refused: the data is broken, not a few files."""
    for split, items in splits.items():
        if not items:
            raise UserError(f"the {split} split of {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    every = [item for items in splits.values() for item in items]
    reasons = dict(zip(every, images.problems([path for path, _ in every], worker_count(None))))
    for split, items in splits.items():
        bad = [(item[0], reasons[item]) for item in items if reasons[item]]
        if 2 * len(bad) > len(items):
            raise UserError(f"{len(bad)} of the {len(items)} images in the {split} split of {folder} cannot be "
                            f"read, e.g. {bad[0][0]} ({bad[0][1]})")
    good = {split: [item for item in items if not reasons[item]] for split, items in splits.items()}
    return good, [(path, why) for (path, _), why in reasons.items() if why]


def _load_imagefolder(folder, walker):
    train = folder / TRAIN_DIR
    val = next((folder / d for d in VAL_DIRS if (folder / d).is_dir()), None)
    test = folder / TEST_DIR if (folder / TEST_DIR).is_dir() else None
    if val is None:
        val, test = test, None  # test/ alone is validated on (and said so)
    if val is None:
        raise UserError(f"ImageFolder {folder} has train/ but no validation split ({'/, '.join(VAL_DIRS)}/ or "
                        f"{TEST_DIR}/)")
    names = sorted(next(walker.walk(train))[1])
    if not names:
        raise UserError(f"{train} has no class folders")
    for other in filter(None, (val, test)):
        other_names = sorted(next(walker.walk(other))[1])
        if other_names != names:
            raise UserError(f"train and {other.name} classes differ in {folder}: train has {names}, {other.name} "
                            f"has {other_names}")
    parts = {"train": train, "val": val, **({"test": test} if test else {})}
    splits, skipped = _readable(folder, {split: _image_files(path, names, walker) for split, path in parts.items()})
    return DataSource("imagefolder", folder, names, splits["train"], splits["val"],
                      sizes={split: len(items) for split, items in splits.items()}, skipped=skipped,
                      test=splits.get("test"), val_name=val.name)


# ---------------------------------------------------------------- class folders without a split

def _holds_images(folder):
    """Whether `folder` holds an image file itself (a cheap look: the first one found is enough)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".") and e.is_file()
                       for e in entries)
    except OSError:
        return False


def stratified_split(items, num_classes, fraction, seed):
    """(train, val) of [(path, label)]: `fraction` of each class (at least one image, and never all of them) to
    val, chosen by a generator seeded with `seed`, so the same files and seed always give the same split."""
    rng = np.random.default_rng(seed)
    groups = [[] for _ in range(num_classes)]
    for item in items:
        groups[item[1]].append(item)
    train, val = [], []
    for group in groups:
        held = min(len(group) - 1, max(1, round(len(group) * fraction))) if len(group) > 1 else 0
        chosen = set(rng.permutation(len(group))[:held].tolist())
        for i, item in enumerate(group):
            (val if i in chosen else train).append(item)
    return train, val


def read_split(path):
    """A split.json written by an earlier run, checked."""
    import json
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        if not (isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("classes", "train", "val"))
                and all(isinstance(f, str) for k in ("classes", "train", "val") for f in saved[k])):
            raise ValueError("it needs lists of classes, train and val files")
        listed = saved["train"] + saved["val"]
        if len(set(listed)) != len(listed):
            raise ValueError("a file is listed twice, or in both train and val")
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"split {path} is damaged or unreadable ({exc})") from None
    return saved


def _apply_saved(folder, names, items, saved, log):
    """(train, val) as the saved split has them. Files it lists that are gone are dropped; files it does not list
    (added since) are left out rather than guessed at, so no validation image of that run is ever trained on."""
    if saved["classes"] != names:
        raise UserError(f"the saved split's classes {saved['classes']} differ from the class folders of {folder}: "
                        f"{names}")
    by_name = {path.relative_to(folder).as_posix(): (path, label) for path, label in items}
    listed = {name for part in ("train", "val") for name in saved[part]}
    train, val = ([by_name[name] for name in saved[part] if name in by_name] for part in ("train", "val"))
    gone, new = len(listed - by_name.keys()), len(by_name.keys() - listed)
    if gone:
        log(f"{gone} image(s) of the saved split are no longer in {folder}")
    if new:
        log(f"leaving out {new} image(s) of {folder} that the saved split does not list (added since it was made): "
            f"{named(sorted(by_name.keys() - listed))}")
    return train, val


def _load_class_folders(folder, names, walker, plan, log):
    return _split_and_load(folder, names, _image_files(folder, names, walker), plan, log, "class folders")


def _split_and_load(folder, names, items, plan, log, layout):
    """Labelled images without a split, split as `plan` says (and recorded for split.json)."""
    if plan.saved:
        train, val = _apply_saved(folder, names, items, plan.saved, log)
        fraction, seed = plan.saved.get("val_split"), plan.saved.get("seed")
    else:
        train, val = stratified_split(items, len(names), plan.fraction, plan.seed)
        fraction, seed = plan.fraction, plan.seed
    record = {"layout": layout, "val_split": fraction, "seed": seed, "classes": names,
              "train": [path.relative_to(folder).as_posix() for path, _ in train],
              "val": [path.relative_to(folder).as_posix() for path, _ in val]}
    splits, skipped = _readable(folder, {"train": train, "val": val})
    return DataSource("imagefolder", folder, names, splits["train"], splits["val"],
                      sizes={split: len(items) for split, items in splits.items()}, skipped=skipped, split=record)


# ---------------------------------------------------------------- a flat folder of images and a CSV of labels

FILE_COLUMNS = ("filename", "file", "image", "image_id", "id", "path")
LABEL_COLUMNS = ("label", "class", "category", "breed", "species")


def _labels_csv(folder, files):
    """The CSV in `folder` that labels its images (a header naming a file column and a label column), or None."""
    import csv
    for name in sorted(f for f in files if f.lower().endswith(".csv")):
        try:
            with open(folder / name, "rb") as table:  # the header alone: the rest is read (and judged) later
                first = table.readline(1 << 16).decode("utf-8-sig", errors="replace")
            header = [column.strip().lower() for column in next(csv.reader([first]), [])]
        except (OSError, csv.Error):
            continue
        if any(c in header for c in FILE_COLUMNS) and any(c in header for c in LABEL_COLUMNS):
            return folder / name
    return None


MAX_LABEL = 100  # characters: a class name also names a file (examples/<class>.png) and an Aim context


def _read_rows(table):
    """(file, label) of every row of the CSV, refused with one line when it cannot be parsed."""
    import csv
    try:
        with open(table, newline="", encoding="utf-8-sig") as rows:
            reader = csv.DictReader(rows)
            columns = {column.strip().lower(): column for column in reader.fieldnames}
            file_column = columns[next(c for c in FILE_COLUMNS if c in columns)]
            label_column = columns[next(c for c in LABEL_COLUMNS if c in columns)]
            return [((row.get(file_column) or "").strip(), (row.get(label_column) or "").strip()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise UserError(f"{table} cannot be read as a CSV of file names and labels ({exc})") from None


def _image_named(folder, file):
    """The image file `file` names in `folder` (its extension may be left out), or None; never outside it."""
    if not file or "\0" in file or any(len(part.encode()) > 255 for part in file.split("/")):
        return None
    for candidate in (file, *(file + ext for ext in IMAGE_EXTENSIONS)):
        path = folder / candidate
        try:
            if path.is_file() and path.resolve().is_relative_to(folder.resolve()):
                return path
        except OSError:
            return None
    return None


def _load_labelled_images(folder, table, plan, log):
    """Kaggle's form: images beside (or below) a CSV of file name and label. A name may leave out its extension;
    rows whose image is missing, or that point outside the folder, are skipped and counted; an image listed twice
    counts once, and one given two labels is refused."""
    pairs = _read_rows(table)
    labelled, missing, repeated = {}, [], 0
    for number, (file, label) in enumerate(pairs, 2):
        if label and (any(c in label for c in "/\\\0") or label.startswith(".") or len(label) > MAX_LABEL):
            raise UserError(f"{table.name} line {number}: label {label[:MAX_LABEL]!r} cannot name a class (no '/', "
                            f"'\\', leading '.', or more than {MAX_LABEL} characters)")
        path = _image_named(folder, file)
        if path is None or not label:
            missing.append(file or "(empty)")
            continue
        real = os.path.realpath(path)
        if real in labelled and labelled[real][1] != label:
            raise UserError(f"{table.name} line {number}: {file} is labelled both {labelled[real][1]!r} and "
                            f"{label!r}")
        repeated += real in labelled
        labelled.setdefault(real, (path, label))
    if 2 * len(missing) > len(pairs):
        raise UserError(f"{len(missing)} of the {len(pairs)} rows of {table} name no image in {folder}, "
                        f"e.g. {missing[0]}")
    if missing or repeated:
        log(f"skipping {len(missing) + repeated} row(s) of {table.name}: {len(missing)} that name no image in "
            f"{folder}{': ' + named(missing) if missing else ''}, {repeated} that repeat an image")
    names = sorted({label for _, label in labelled.values()})
    if len(names) < 2:
        raise UserError(f"{table} labels fewer than two classes of images")
    index = {name: i for i, name in enumerate(names)}
    items = [(path, index[label]) for path, label in labelled.values()]
    return _split_and_load(folder, names, items, plan, log, f"images labelled by {table.name}")


# ---------------------------------------------------------------- pipelines

def worker_count(requested):
    """mindspore.dataset refuses more workers than cores."""
    cores = os.cpu_count() or 1
    return max(1, min(requested or cores, cores))


def eval_transforms(image_size, data_format="imagefolder"):
    """The validation transform for one HWC uint8 image, by the data's format: photos (imagefolder) are resized to
    image_size / 0.875 and centre-cropped; CIFAR images are resized whole.

    Inference uses it too (on images read by images.read_rgb, as training reads them), so a served model sees its
    input exactly as validation did.
    """
    from mindspore.dataset import vision
    if data_format == "imagefolder":
        ops = [vision.Resize(round(image_size / CROP_RATIO)), vision.CenterCrop(image_size)]
    else:
        ops = [vision.Resize((image_size, image_size))]
    return ops + _to_tensor()


def _to_tensor():
    from mindspore.dataset import vision
    return [vision.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), vision.HWC2CHW()]


def opencv():
    try:
        import cv2
    except ImportError:
        raise UserError("preparing images for the model needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def eval_resized_pixels(height, width, image_size, data_format="imagefolder"):
    """How many pixels the validation transform's resize makes of a height x width image (before the crop)."""
    if data_format != "imagefolder":
        return image_size * image_size
    short = round(image_size / CROP_RATIO)
    return short * short * max(height, width) / min(height, width)


def eval_array(pixels, image_size, data_format="imagefolder"):
    """eval_transforms without mindspore.dataset, for serving where MindSpore is not installed: one HWC uint8 RGB
    image to the CHW float32 input, equal to eval_transforms' to the last bit (tests/test_onnx_serving.py). Both
    resize with OpenCV's bilinear (mindspore.dataset's CPU Resize is OpenCV's); the shorter side goes to the target
    and the longer one is scaled in float32 and truncated, and the crop's offset floored, as mindspore.dataset's."""
    cv2 = opencv()
    pixels = np.ascontiguousarray(pixels, np.uint8)
    if data_format == "imagefolder":
        short, (height, width) = round(image_size / CROP_RATIO), pixels.shape[:2]
        long = int(np.float32(short) * (np.float32(max(height, width)) / np.float32(min(height, width))))
        size = (short, long) if height <= width else (long, short)
        pixels = cv2.resize(pixels, size[::-1], interpolation=cv2.INTER_LINEAR)
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        pixels = pixels[top:top + image_size, left:left + image_size]
    else:
        pixels = cv2.resize(pixels, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    normalised = (pixels.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


@dataclass(frozen=True)
class Regularisers:
    """Training augmentation beyond crop and flip (all off by default): an augmentation policy on each image,
    random erasing on its normalised tensor, and mixup / cutmix on whole batches, whose labels become soft (rows of
    class probabilities over `num_classes`)."""
    auto_augment: str = "none"   # randaugment, trivialaugment or autoaugment (its ImageNet policy)
    random_erasing: float = 0.0  # probability per image
    mixup: float = 0.0           # alpha of the Beta distribution of the blend; 0: off
    cutmix: float = 0.0          # alpha of the patch area's distribution; 0: off
    num_classes: int = 0

    @classmethod
    def from_args(cls, args, num_classes):
        return cls(args.auto_augment, args.random_erasing, args.mixup, args.cutmix, num_classes)

    @property
    def mixes(self):
        return self.mixup > 0 or self.cutmix > 0

    def image_ops(self):
        """On the cropped HWC uint8 image."""
        from mindspore.dataset import vision
        policy = {"randaugment": vision.RandAugment, "trivialaugment": vision.TrivialAugmentWide,
                  "autoaugment": vision.AutoAugment}.get(self.auto_augment)
        return [policy()] if policy else []

    def tensor_ops(self):
        """On the normalised CHW tensor (erased to 0, the mean colour)."""
        from mindspore.dataset import vision
        return [vision.RandomErasing(prob=self.random_erasing)] if self.random_erasing > 0 else []

    def batch_op(self):
        """On a batch of (NCHW images, one-hot labels): mixup or cutmix, each batch one of them at even odds when
        both are on (timm's default switch probability)."""
        from mindspore.dataset import transforms, vision
        ops = ([vision.MixUpBatch(self.mixup)] if self.mixup > 0 else []) + \
              ([vision.CutMixBatch(vision.ImageBatchFormat.NCHW, self.cutmix)] if self.cutmix > 0 else [])
        return ops[0] if len(ops) == 1 else transforms.RandomChoice(ops)


def _transforms(source, image_size, augment, regularisers=Regularisers()):
    from mindspore.dataset import vision
    if not augment:
        return eval_transforms(image_size, source.kind)
    if source.kind == "imagefolder":
        crop = [vision.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(0.75, 1.333))]
    else:  # CIFAR: native-size padded crop, or resized to image_size (e.g. 224 to fine-tune ImageNet weights)
        crop = [] if image_size == CIFAR_SIDE else [vision.Resize((image_size, image_size))]
        crop += [vision.RandomCrop(image_size, padding=image_size // 8)]
    return crop + [vision.RandomHorizontalFlip(prob=0.5)] + regularisers.image_ops() + _to_tensor() + \
        regularisers.tensor_ops()


class _ImageFiles:
    """(RGB pixels, label) of checked image files, by index: a random-access source for GeneratorDataset. PIL
    decodes, as in the inference app, so every format and mode it accepts trains the same way."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        return images.read_rgb(path), np.int32(label)


def create_dataset(source, split, image_size, batch_size, workers=None, shuffle=None, shard=None, augment=None,
                   drop_remainder=None, regularisers=Regularisers(), pad_last_batch=False):
    """A batched (image, label) pipeline for `split` ("train" or "val").

    Training drops the last partial batch so every step has the same shape (one graph compile, sane BatchNorm).
    Evaluation keeps it; with `pad_last_batch` (and at least one full batch) it is filled up with black images
    labelled PADDING_LABEL, so that it runs on the graph the full batches compiled instead of compiling one of its
    own: seconds a job on CPU, more on Ascend, for at most batch_size - 1 images more to evaluate an epoch.
    `shard` is (num_shards, shard_id) for data parallel runs. `regularisers` apply when augmenting (training).
    """
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore.dataset.transforms import TypeCast
    training = split == "train"
    shuffle = training if shuffle is None else shuffle
    augment = training if augment is None else augment
    workers = worker_count(workers)
    sharding = {"num_shards": shard[0], "shard_id": shard[1]} if shard else {}
    data = {"train": source.train, "val": source.val, "test": source.test}[split]
    if source.kind == "imagefolder":  # threads: PIL decodes without the GIL
        dataset = ds.GeneratorDataset(_ImageFiles(data), ["image", "label"], shuffle=shuffle,
                                      num_parallel_workers=workers, python_multiprocessing=False, **sharding)
    else:
        pixels, labels = data
        dataset = ds.NumpySlicesDataset({"image": pixels, "label": labels}, shuffle=shuffle,
                                        num_parallel_workers=1, **sharding)
    regularisers = regularisers if augment else Regularisers()
    dataset = dataset.map(operations=_transforms(source, image_size, augment, regularisers), input_columns="image",
                          num_parallel_workers=workers)
    if regularisers.mixes:
        from mindspore.dataset.transforms import OneHot
        labels = [TypeCast(ms.int32), OneHot(regularisers.num_classes), TypeCast(ms.float32)]
    else:
        labels = [TypeCast(ms.int32)]
    dataset = dataset.map(operations=labels, input_columns="label")
    drop_remainder = training if drop_remainder is None else drop_remainder
    count = dataset.get_dataset_size()
    if drop_remainder and count < batch_size:  # nothing would be left
        raise UserError(f"the training split has {count} images, fewer than --batch_size {batch_size}")
    if regularisers.mixes:  # training: one-hot labels, never filled up
        dataset = batch(dataset, batch_size, drop_remainder)
        return dataset.map(operations=regularisers.batch_op(), input_columns=["image", "label"])
    return batch(dataset, batch_size, drop_remainder, pad_last_batch)


def batch(dataset, batch_size, drop_remainder=False, pad_last_batch=False):
    """`dataset` of (image, label) rows in batches; with `pad_last_batch` (see create_dataset), the last short one
    filled up when there is a full one before it (alone, a short batch is one graph anyway)."""
    count = dataset.get_dataset_size()
    short = 0 if drop_remainder or count < batch_size else -count % batch_size
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if pad_last_batch and short:
        dataset = dataset.map(operations=_FillBatch(batch_size), input_columns=["image", "label"])
    return dataset


def without_padding(labels, *arrays):
    """(labels, *arrays) without the rows that fill a last batch up (labelled PADDING_LABEL, by _FillBatch); the
    arrays are row-aligned with the labels. One-hot labels (mixed batches, never filled up) pass through."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels == PADDING_LABEL).any():
        return (labels, *arrays)
    real = labels != PADDING_LABEL
    return (labels[real], *(np.asarray(array)[real] for array in arrays))


class _FillBatch:
    """A batch of (images, labels) with fewer rows than `size` gets rows of zeros labelled PADDING_LABEL."""

    def __init__(self, size):
        self.size = size

    def __call__(self, images, labels):
        missing = self.size - len(labels)
        if missing <= 0:
            return images, labels
        return (np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)]),
                np.concatenate([labels, np.full(missing, PADDING_LABEL, labels.dtype)]))


def skip_finished_epochs(dataset, epochs_done, exact=False):
    """A resumed job's epochs get the shuffle order an uninterrupted job would have given them, so resuming does not
    change what the model sees. This is MindSpore's own failover recovery (`set_init_step`, in steps, with or
    without a dataset sink). Its fast mode skips the finished epochs unread, so random augmentations are drawn
    anew; `exact` replays them instead: the same images, bit for bit."""
    import mindspore.dataset as ds
    if not (epochs_done and hasattr(dataset, "set_init_step")):  # MindSpore before 2.0 cannot; it starts afresh
        return
    if hasattr(ds.config, "set_fast_recovery"):
        ds.config.set_fast_recovery(not exact)
    dataset.set_init_step(epochs_done * dataset.get_dataset_size())


def preview_batch(source, split, image_size, count=16):
    """The first `count` images of a split, without augmentation: (HWC uint8 for display, the network's NCHW
    float32 input, labels)."""
    count = min(count, source.sizes[split])
    data = create_dataset(source, split, image_size, batch_size=count, workers=1, shuffle=False, augment=False)
    inputs, labels = next(data.create_tuple_iterator(output_numpy=True))
    display = inputs.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(display.round(), 0, 255).astype(np.uint8), inputs, labels
