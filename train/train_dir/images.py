"""Image files as training and the inference app read them: one decoder (PIL), every mode turned into RGB the same
way, and a check, before training, for files that cannot be read (empty, not an image, cut short, too many pixels),
so that one bad file never stops a job mid-epoch."""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import one_line

MAX_PIXELS = 40_000_000  # larger images are refused (decompression bombs); a 40 MP photo still passes
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def to_rgb(image):
    """RGB from any PIL mode: high bit depth grey scaled by its range, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grey: scale to 8 bits by its range
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def read_rgb(path):
    """The HWC uint8 RGB pixels of an image file (the first frame of an animation), EXIF rotation applied. One above
    MAX_PIXELS is refused before any pixel is decoded (ValueError)."""
    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels, above the limit of {MAX_PIXELS} pixels")
        return np.asarray(to_rgb(ImageOps.exif_transpose(image)))


def problem(path):
    """Why the image file at `path` cannot be used, or None. It goes through read_rgb's steps (a JPEG decoded at
    1/8 scale, which still reads the whole stream), so training never meets an error; one above MAX_PIXELS is
    refused before any pixel is read."""
    too_large = f"above the limit of {MAX_PIXELS // 1_000_000} million pixels: a decompression bomb?"
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                return f"{image.width}x{image.height} pixels, {too_large}"
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:  # PIL's own limit, met while opening
        return too_large
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Exception as exc:  # a hostile file breaks decoders in many ways (OSError, SyntaxError, struct.error, ...)
        return f"corrupt or truncated: {one_line(exc, limit=None)}"
    return None


def problems(paths, workers, chunk=256):
    """`problem(path)` for every path, `workers` threads at a time (PIL decodes without holding the GIL), in chunks
    of up to `chunk` paths (a task per file costs more than checking a small one), at least 4 per worker."""
    chunk = max(1, min(chunk, -(-len(paths) // (4 * max(1, workers)))))

    def check(start):
        return [problem(path) for path in paths[start:start + chunk]]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes are checked here against MAX_PIXELS
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return [why for part in pool.map(check, range(0, len(paths), chunk)) for why in part]
