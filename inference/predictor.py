"""Class probabilities for images from a model that train.py produced; importable without Gradio or MindSpore.

    from predictor import Predictor
    model = Predictor.load("OUT/resnet50-best.onnx")        # or the .ckpt / .mindir; labels.json is read beside it
    model.predict([Image.open("dog.jpg")], top_k=3)         # [[("dog", 0.93), ("wolf", 0.05), ...]]

An `.onnx` runs on onnxruntime and never imports MindSpore; a `.ckpt` is loaded into the network of
train/train_dir/resnet.py (the one definition) and a `.mindir` runs as a MindSpore graph. Images are prepared as
training's validation transform prepares them (datasets.eval_array, equal to it to the last bit), without
mindspore.dataset.
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
from datasets import eval_array, eval_resized_pixels, opencv  # noqa: E402
from fetch_model import PLACEHOLDER, PLACEHOLDER_HINT  # noqa: E402
from errors import UserError  # noqa: E402
from images import MAX_PIXELS, to_rgb  # noqa: E402


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
    """The model file in `folder` (as the platform's pod places `model_path` files), chosen as eval.py and
    predict.py choose: an .onnx when onnxruntime is installed, else a .ckpt, else a .mindir; *best* first."""
    found = trained_model.choose(folder)
    if found is None:
        config = Path(folder) / "config.json"
        unset = config.is_file() and PLACEHOLDER in config.read_text(errors="replace")
        raise UserError(f"no model (.onnx, .ckpt or .mindir) in {folder}: pass --model PATH or set MODEL_PATH"
                        + (f"; {config} still names {PLACEHOLDER}: {PLACEHOLDER_HINT}" if unset else ""))
    return found


class Predictor:
    """Batches of images in, (class name, probability) lists out."""

    def __init__(self, forward, labels, model_path):
        self.forward = forward
        self.labels = labels
        self.model_path = Path(model_path)
        self.class_names = labels["class_names"]
        self.image_size = int(labels["image_size"])
        self.data_format = labels.get("data_format", "imagefolder")

    @classmethod
    def load(cls, model_path, labels_path=None):
        if Path(model_path).suffix.lower() != ".onnx":
            _start_mindspore()
        opencv()  # missing, it is one error line at start, not one at every request
        labels, forward = trained_model.load(model_path, labels_path)
        return cls(forward, labels, model_path)

    def preprocess(self, image):
        """One RGB PIL image to the network's CHW float32 input. A sliver (a 1 x 20000 image is a few hundred
        bytes) would be resized to gigabytes before the crop: refused."""
        if eval_resized_pixels(image.height, image.width, self.image_size, self.data_format) > MAX_PIXELS:
            raise BadImage(f"the image is too narrow to classify ({image.width}x{image.height} pixels: resized to "
                           f"{self.image_size} pixels across, it would be above {MAX_PIXELS // 1_000_000} million)")
        return eval_array(np.asarray(image, dtype=np.uint8), self.image_size, self.data_format)

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


def _start_mindspore():
    """CPU inference in GRAPH_MODE, with oneDNN capped at AVX2 before the first op (10-30x faster convolutions on
    AVX-512 hosts). Without MindSpore, trained_model.load says what to install."""
    try:
        import mindspore as ms
    except ImportError:
        return
    import runtime
    runtime.tune_cpu_env()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
