"""The sample stage's figures: labelled rows and columns, a progression GIF that opens on a change and
counts tokens, and byte-identical reruns."""

from __future__ import annotations

import numpy as np
from PIL import Image

from spectralar.stages.sample import first_visible_prefix, label, tile, write_grids


def _images(count: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def _ink(picture: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Non-white pixels of ``picture`` inside ``box``: drawn text."""
    return int((np.asarray(picture.convert("L").crop(box)) < 128).sum())


def test_row_titles_sit_left_of_the_images_and_column_titles_above():
    images = _images(6)
    plain = tile(images, 3)
    titled = tile(images, 3, row_titles=["first row", "second"], column_titles=["1", "2", "3"])
    margin, header = titled.width - plain.width, titled.height - plain.height
    assert margin > 0 and header > 0
    assert np.array_equal(np.asarray(titled)[header:, margin:], np.asarray(plain))  # images unchanged
    cell = plain.height // 2
    for row in range(2):  # each title in its own row's band of the margin
        assert _ink(titled, (0, header + row * cell, margin, header + (row + 1) * cell)) > 0
    assert _ink(titled, (margin, 0, titled.width, header)) > 0
    assert _ink(titled, (0, 0, margin, header)) == 0


def test_a_title_widens_a_narrow_figure_to_fit():
    picture = tile(_images(1), 1)
    titled = label(picture, (picture.width, picture.height), (0, 0), title="a long title over one small image")
    assert titled.width > picture.width and _ink(titled, (picture.width, 0, titled.width, titled.height)) > 0


def test_grid_rows_carry_the_class_names(tmp_path):
    images, labels = _images(6, channels=3), np.array([0, 1, 2, 0, 1, 2])
    names = ["T-shirt/top", "Trouser", "Ankle boot"]
    write_grids(tmp_path, images, labels, names)
    grid = Image.open(tmp_path / "grid.png")
    plain = tile(images[[0, 3, 1, 4, 2, 5]], 2)
    assert grid.height == plain.height and grid.width > plain.width  # a margin of names, one per row
    margin = grid.width - plain.width
    assert all(_ink(grid, (0, r * plain.height // 3, margin, (r + 1) * plain.height // 3)) > 0 for r in range(3))
    assert {p.name for p in tmp_path.iterdir()} == {"grid.png", "grid_0_t-shirt-top.png", "grid_1_trouser.png",
                                                    "grid_2_ankle-boot.png"}
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_grids(tmp_path, images, labels, names)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first  # same inputs, same bytes


def test_the_progression_starts_where_the_images_first_change():
    grey = np.full((2, 8, 8, 1), 128, np.uint8)
    almost = grey.copy()
    almost[0, 0, 0] = 140  # one pixel: a mean change far below a visible one
    shape = grey.copy()
    shape[1, 2:6, 2:6] = 20  # one sample of the batch gains a visible square
    frames = [grey, almost, grey, shape, shape]
    assert first_visible_prefix(frames) == 2  # frames 0, 1 look like their successors; 2 -> 3 changes
    assert first_visible_prefix([shape, grey]) == 0
    assert first_visible_prefix([grey, grey, grey]) == 2  # nothing changes: only the finished image
