"""What people upload to the inference app becomes an RGB image, or one clear message."""
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "inference"))
from predictor import BadImage, read_image  # noqa: E402
from test_inference import bad_uploads  # noqa: E402


def saved(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_every_mode_becomes_rgb_with_the_right_colours(tmp_path):
    red = Image.new("RGB", (4, 4), (200, 30, 10))
    cases = {
        "grey.png": (Image.new("L", (4, 4), 128), (128, 128, 128)),
        "rgba.png": (Image.new("RGBA", (4, 4), (200, 30, 10, 255)), (200, 30, 10)),
        "transparent.png": (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),  # on white, not black
        "grey-alpha.png": (Image.new("LA", (4, 4), (50, 255)), (50, 50, 50)),
        "palette.png": (red.convert("P", palette=Image.Palette.ADAPTIVE), (200, 30, 10)),
        "cmyk.jpg": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    }
    for name, (image, colour) in cases.items():
        rgb = read_image(saved(tmp_path, image, name, **({"quality": 100} if name.endswith(".jpg") else {})))
        assert rgb.mode == "RGB" and rgb.size == (4, 4), name
        np.testing.assert_allclose(np.asarray(rgb)[1, 1], colour, atol=3, err_msg=name)


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    rgb = np.asarray(read_image(saved(tmp_path, Image.fromarray(ramp), "deep.png")))
    assert rgb.dtype == np.uint8 and rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert (np.diff(rgb[..., 0].reshape(-1).astype(int)) >= 0).all()  # order kept


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (6, 3), (10, 200, 10))
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees to display
    assert read_image(saved(tmp_path, image, "rotated.jpg", exif=exif.tobytes())).size == (3, 6)


@pytest.mark.parametrize("message", ["not an image", "corrupt or truncated", "too large"])
def test_bad_uploads_are_refused_with_a_message(tmp_path, message):
    with pytest.raises(BadImage, match=message):
        read_image(bad_uploads(tmp_path)[message])
