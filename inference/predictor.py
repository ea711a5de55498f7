"""Class probabilities for images from a model that train.py produced; importable without Gradio.

    from predictor import Predictor
    model = Predictor.load("OUT/resnet50-best.ckpt")        # or the .mindir; labels.json is read beside it
    model.predict([Image.open("dog.jpg")], top_k=3)         # [[("dog", 0.93), ("wolf", 0.05), ...]]

A `.ckpt` is loaded into the network of train/train_dir/resnet.py (the one definition); a `.mindir` runs as a graph
with no network code. Images are prepared by the validation transform of train/train_dir/datasets.py.
"""
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
sys.path.insert(0, str(HERE.parent / "train" / "train_dir"))

import trained_model  # noqa: E402
from fetch_model import PLACEHOLDER, PLACEHOLDER_HINT  # noqa: E402
from errors import UserError  # noqa: E402
from images import MAX_PIXELS, to_rgb  # noqa: E402

MODEL_SUFFIXES = (".ckpt", ".mindir", ".onnx")  # in order of preference


class BadImage(ValueError):
    """An upload that is not a usable image; its message is shown to the user."""


def read_image(source):
    """An RGB PIL image from a path, bytes-like file or PIL image; every mode (L, LA, P, RGBA, CMYK, I;16, ...)
    is converted, transparency is composited on white, and EXIF rotation is applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = source if isinstance(source, Image.Image) else Image.open(source)
            if image.width * image.height > MAX_PIXELS:
                raise BadImage(f"the image is too large ({image.width}x{image.height} pixels; the limit is "
                               f"{MAX_PIXELS // 1_000_000} million)")
            image.load()
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"the image is too large (more than {MAX_PIXELS // 1_000_000} million pixels)") from None
    except UnidentifiedImageError:
        raise BadImage("this file is not an image that can be read (PNG, JPEG, BMP, GIF, TIFF or WebP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"the image is corrupt or truncated ({exc})") from None
    return to_rgb(image)


def find_model(folder=HERE):
    """The model file in `folder` (as the platform's pod places `model_path` files): a .ckpt, else a .mindir,
    preferring one named *best*."""
    found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in MODEL_SUFFIXES)
    if not found:
        config = Path(folder) / "config.json"
        unset = config.is_file() and PLACEHOLDER in config.read_text(errors="replace")
        raise UserError(f"no model (.ckpt, .mindir or .onnx) in {folder}: pass --model PATH or set MODEL_PATH"
                        + (f"; {config} still names {PLACEHOLDER}: {PLACEHOLDER_HINT}" if unset else ""))
    return sorted(found, key=lambda p: (MODEL_SUFFIXES.index(p.suffix.lower()), "best" not in p.name))[0]


class Predictor:
    """Batches of images in, (class name, probability) lists out."""

    def __init__(self, forward, labels, model_path):
        self.forward = forward
        self.labels = labels
        self.model_path = Path(model_path)
        self.class_names = labels["class_names"]
        self.image_size = int(labels["image_size"])
        self.data_format = labels.get("data_format", "imagefolder")
        from datasets import eval_transforms
        from mindspore.dataset.transforms import Compose
        self.transform = Compose(eval_transforms(self.image_size, self.data_format))

    @classmethod
    def load(cls, model_path, labels_path=None):
        import runtime
        runtime.tune_cpu_env()  # before the first op: on AVX-512 hosts, 10-30x faster convolutions
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        labels, forward = trained_model.load(model_path, labels_path)
        return cls(forward, labels, model_path)

    def preprocess(self, image):
        """One RGB PIL image to the network's CHW float32 input."""
        return self.transform(np.asarray(image, dtype=np.uint8))

    def probabilities(self, images):
        """(N, classes) softmax probabilities for a list of images (paths, files or PIL images)."""
        batch = np.stack([self.preprocess(read_image(image)) for image in images]).astype(np.float32)
        return trained_model.softmax(self.forward(batch)[:, :len(self.class_names)])

    def predict(self, images, top_k=5):
        """For each image, the `top_k` (class name, probability) pairs, most probable first."""
        results = []
        for row in self.probabilities(images):
            order = np.argsort(-row)[:top_k]
            results.append([(self.class_names[i], float(row[i])) for i in order])
        return results
