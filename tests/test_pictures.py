"""The job's pictures (export.py): each image of a grid in its own cell, in reading order, whatever its format."""
import numpy as np
import pytest
from PIL import Image

import export

# Ten flat colours, none white (the grid's background) and none close to the titles' black.
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128)]


def boxes(picture, colours):
    """Each colour's bounding box (top, left, bottom, right) in the saved picture."""
    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    found = []
    for colour in colours:
        rows, columns = np.nonzero((np.abs(pixels - colour).sum(axis=2) <= 6))
        assert rows.size, colour
        found.append((rows.min(), columns.min(), rows.max(), columns.max()))
    return found


def test_a_grid_puts_each_image_in_its_own_cell_in_reading_order(tmp_path):
    images = [np.full((32, 32, 3), colour, dtype=np.uint8) for colour in COLOURS]
    path = export.plot_image_grid(images, [f"image {i}\n(second line)" for i in range(10)], tmp_path / "grid.png",
                                  ["green", "red"] * 5, columns=8)
    found = boxes(path, COLOURS)
    assert Image.open(path).size == pytest.approx((8 * 160, 2 * 200), rel=0.02)  # 1.6 x 2.0 inch cells, 100 dpi
    sides = [side for top, left, bottom, right in found for side in (bottom - top, right - left)]
    assert 120 <= min(sides) <= max(sides) <= min(sides) + 3 <= 150  # every image whole, ~1.4 inches wide
    first_row, second_row = found[:8], found[8:]
    assert all(a[1] < b[1] for a, b in zip(first_row, first_row[1:]))  # left to right
    assert max(box[2] for box in first_row) < min(box[0] for box in second_row)  # then the next row
    assert all(box[0] > 20 for box in found[:8])  # room above each image for its title


def test_greyscale_mixed_sizes_and_fewer_images_than_a_row(tmp_path):
    grey = np.full((32, 32), 90, dtype=np.uint8)  # HW, as a greyscale photograph decodes
    large = np.full((224, 224, 3), COLOURS[0], dtype=np.uint8)
    portrait = np.full((64, 48, 1), 200, dtype=np.uint8)
    path = export.plot_image_grid([grey, large, portrait], ["", "", ""], tmp_path / "grid.png")
    (grey_box, large_box, portrait_box) = boxes(path, [(90, 90, 90), COLOURS[0], (200, 200, 200)])
    side = large_box[2] - large_box[0]
    assert abs(grey_box[2] - grey_box[0] - side) <= 3 and abs(grey_box[3] - grey_box[1] - side) <= 3  # scaled up
    assert abs(portrait_box[2] - portrait_box[0] - side) <= 3  # as tall as the others, its shape kept:
    assert abs((portrait_box[3] - portrait_box[1]) / side - 48 / 64) <= 0.03
    assert grey_box[3] < large_box[1] and large_box[3] < portrait_box[1]  # side by side, in order
    empty = export.plot_image_grid([], [], tmp_path / "empty.png")
    assert Image.open(empty).size == pytest.approx((8 * 160, 200), rel=0.02)


def test_wide_images_keep_room_for_two_lines_of_title(tmp_path):
    wide = [np.full((32, 256, 3), colour, dtype=np.uint8) for colour in COLOURS[:4]]
    path = export.plot_image_grid(wide, ["a\nb"] * 4, tmp_path / "wide.png", columns=2)
    found = boxes(path, COLOURS[:4])
    assert found[0][2] < found[2][0] - 30  # two text lines (7 pt, ~20 px) fit between the rows
    pixels = np.asarray(Image.open(path).convert("L"))
    between = pixels[found[0][2] + 2:found[2][0] - 1, found[2][1]:found[2][3]]
    assert (between < 128).any()  # the title of the image below is drawn there


def test_every_image_needs_a_title():
    with pytest.raises(ValueError):
        export.plot_image_grid([np.zeros((8, 8, 3), np.uint8)] * 2, ["one"], "unused.png")
