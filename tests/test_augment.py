"""Augmentations in plain torch (vision/augment.py) against PIL and their definitions, the
scikit-image photo crops, and the decoder's crops. No Ray here."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vision.augment import (
    OPERATIONS,
    RandAugmentSettings,
    rand_augment,
    random_erasing,
    random_resized_crop,
    sample_crop_box,
)
from vision.data import decode_image, load_builtin, photo_crop_boxes


def test_crop_boxes_follow_the_scale_and_ratio_rule():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, box_h, box_w = sample_crop_box(60, 90, (0.1, 0.5), (0.5, 2.0), generator)
        assert 0 <= top and top + box_h <= 60 and 0 <= left and left + box_w <= 90
        assert 0.1 * 0.9 <= box_h * box_w / (60 * 90) <= 0.5 * 1.1  # rounding to whole pixels
        assert 0.5 * 0.85 <= box_w / box_h <= 2.0 * 1.15
    # impossible ratios fall back to the centre crop at the nearest allowed ratio
    assert sample_crop_box(10, 100, (0.9, 1.0), (1.0, 1.0), generator) == (0, 45, 10, 10)
    images = torch.rand(3, 3, 16, 16)
    same = random_resized_crop(images, 16, (1.0, 1.0), (1.0, 1.0), generator)
    torch.testing.assert_close(same, images)
    assert random_resized_crop(images, 8, generator=generator).shape == (3, 3, 8, 8)


def pil_reference(name: str, image: Image.Image, magnitude: float, sign: float) -> Image.Image:
    level = magnitude / 10
    factor = 1.0 + sign * 0.9 * level
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(image),
        "Equalize": lambda: ImageOps.equalize(image),
        "Invert": lambda: ImageOps.invert(image),
        "PosterizeIncreasing": lambda: ImageOps.posterize(image, 4 - int(level * 4)),
        "SolarizeIncreasing": lambda: ImageOps.solarize(image, 256 - int(level * 256)),
        "ColorIncreasing": lambda: ImageEnhance.Color(image).enhance(factor),
        "ContrastIncreasing": lambda: ImageEnhance.Contrast(image).enhance(factor),
        "BrightnessIncreasing": lambda: ImageEnhance.Brightness(image).enhance(factor),
        "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(image).enhance(factor),
    }[name]()


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
                                  "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing"])
def test_colour_operations_match_pil(name):
    rng = np.random.default_rng(1)
    pixels = (rng.beta(2, 3, size=(2, 24, 20, 3)) * 230 + 10).astype(np.uint8)  # not spanning 0-255
    images = torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255
    magnitude, sign = torch.tensor([7.0, 3.0]), torch.tensor([1.0, -1.0])
    ours = OPERATIONS[name](images, magnitude, sign)
    for index in range(2):
        expected = np.asarray(pil_reference(name, Image.fromarray(pixels[index]), float(magnitude[index]),
                                            float(sign[index])), dtype=np.float32)
        difference = np.abs(ours[index].permute(1, 2, 0).numpy() * 255 - expected)
        assert difference.max() <= 1.5, (name, difference.max())  # PIL works in whole levels (blends truncate)


def test_solarize_add_and_geometric_operations():
    images = torch.rand(2, 3, 20, 20)
    added = OPERATIONS["SolarizeAdd"](images, torch.tensor([10.0, 10.0]), None)
    levels = (images * 255).round()
    torch.testing.assert_close(added * 255, torch.where(levels < 128, (levels + 110).clamp(max=255), levels))
    fill = torch.tensor([0.1, 0.2, 0.3])
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):  # magnitude 0: unchanged
        torch.testing.assert_close(OPERATIONS[name](images, torch.zeros(2), torch.ones(2), fill), images,
                                   atol=1e-5, rtol=0)
    # translating by 45% of the width moves the content 9 pixels and brings in the fill
    moved = OPERATIONS["TranslateXRel"](images, torch.full((2,), 10.0), torch.ones(2), fill)
    torch.testing.assert_close(moved[..., :11], images[..., 9:], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[..., 12:], fill.view(1, 3, 1, 1).expand(2, 3, 20, 8), atol=1e-5, rtol=0)
    # a rotation by 30 degrees about the centre leaves a radially symmetric picture as it was
    # (inside the circle that stays in view) and moves an off-centre blob by 30 degrees
    y, x = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    radius = ((x - 9.5) ** 2 + (y - 9.5) ** 2).sqrt()
    disc = (radius / 14).expand(2, 3, 20, 20)
    rotated = OPERATIONS["Rotate"](disc, torch.full((2,), 10.0), torch.tensor([1.0, -1.0]), fill)
    inside = radius < 9
    assert (rotated - disc)[..., inside].abs().max() < 0.03
    assert (rotated - disc)[..., ~inside].abs().max() > 0.1  # the corners bring in the fill

    def blob(cx, cy, size=40):
        yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
        return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4).expand(1, 1, size, size)

    def centroid(image):
        yy, xx = torch.meshgrid(torch.arange(float(image.shape[-2])), torch.arange(float(image.shape[-1])),
                                indexing="ij")
        weight = image[0, 0]
        return float((weight * xx).sum() / weight.sum()), float((weight * yy).sum() / weight.sum())

    black = torch.zeros(1)
    spot = blob(19.5 + 10, 19.5)  # 10 pixels right of the centre
    cx, cy = centroid(OPERATIONS["Rotate"](spot, torch.full((1,), 10.0), torch.ones(1), black))
    assert math.hypot(cx - 19.5, cy - 19.5) == pytest.approx(10, abs=0.3)
    assert abs(math.degrees(math.atan2(cy - 19.5, cx - 19.5))) == pytest.approx(30, abs=1.5)
    # ShearX by s = 0.15 (magnitude 5): output x = input x - s * y, y in pixel centres from the top
    spot = blob(20.0, 30.0)
    cx, cy = centroid(OPERATIONS["ShearX"](spot, torch.full((1,), 5.0), torch.ones(1), black))
    assert cy == pytest.approx(30.0, abs=0.05) and cx == pytest.approx(20.0 - 0.15 * 30.5, abs=0.1)
    cx, cy = centroid(OPERATIONS["ShearY"](blob(30.0, 20.0), torch.full((1,), 5.0), torch.ones(1), black))
    assert cx == pytest.approx(30.0, abs=0.05) and cy == pytest.approx(20.0 - 0.15 * 30.5, abs=0.1)


def test_rand_augment_is_seeded_bounded_and_stronger_with_magnitude():
    images = torch.rand(64, 3, 16, 16)
    settings = RandAugmentSettings.parse("rand-m9-mstd0.5-inc1")
    assert settings == RandAugmentSettings(num_ops=2, magnitude=9.0, magnitude_std=0.5, probability=0.5)
    first = rand_augment(images, settings, 0.5, torch.Generator().manual_seed(3))
    again = rand_augment(images, settings, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
    assert first.min() >= 0 and first.max() <= 1 and not torch.equal(first, images)
    untouched = rand_augment(images, RandAugmentSettings(probability=0.0), 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(untouched, images)

    def change(magnitude):  # the "increasing" set: a larger magnitude distorts more
        settings = RandAugmentSettings(num_ops=2, magnitude=magnitude, magnitude_std=0.0, probability=1.0)
        out = rand_augment(images.repeat(4, 1, 1, 1), settings, 0.5, torch.Generator().manual_seed(0))
        return (out - images.repeat(4, 1, 1, 1)).abs().mean().item()

    assert change(9) > change(5) > change(1)
    for bad, message in (("m9-n2", "start with 'rand-'"), ("rand-m9-x3", "unknown RandAugment setting 'x3'"),
                         ("rand-m12", "0 <= m <= 10"), ("rand-m9-inc0", "only the increasing")):
        with pytest.raises(ValueError, match=message):
            RandAugmentSettings.parse(bad)


def test_random_erasing_fills_one_box_per_image():
    images = torch.full((50, 3, 32, 32), 7.0)  # no noise value equals 7
    erased = random_erasing(images, 1.0, generator=torch.Generator().manual_seed(0))
    for image in erased:
        changed = (image != 7.0).any(dim=0)
        rows, cols = torch.nonzero(changed.any(1)).flatten(), torch.nonzero(changed.any(0)).flatten()
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert int(changed.sum()) == int(box)  # one filled rectangle
        assert 0.02 * 0.8 <= int(box) / 1024 <= 1 / 3 * 1.2
    assert torch.equal(random_erasing(images, 0.0, generator=torch.Generator().manual_seed(0)), images)
    some = random_erasing(images, 0.25, generator=torch.Generator().manual_seed(1))
    assert 0.1 < (some != 7).flatten(1).any(1).float().mean() < 0.45


def test_photo_crops_come_from_separate_parts_of_six_photographs():
    (train_x, train_y), (test_x, test_y) = load_builtin("photos", test_fraction=0.2, seed=0, image_size=24)
    assert train_x.shape == (6 * 200, 3, 24, 24) and test_x.shape == (6 * 50, 3, 24, 24)
    assert torch.bincount(train_y).tolist() == [200] * 6 and torch.bincount(test_y).tolist() == [50] * 6
    (again_x, _), _ = load_builtin("photos", test_fraction=0.2, seed=0, image_size=24)
    assert torch.equal(again_x, train_x)
    # test boxes inside the held-out block, training boxes clear of it, both at the same scale
    train, test, (block_top, block_left, block_h, block_w) = photo_crop_boxes(
        512, 600, 200, 50, 0.2, torch.Generator().manual_seed(0))
    assert block_h * block_w == pytest.approx(0.2 * 512 * 600, rel=0.01)
    for top, left, h, w in test:
        assert block_top <= top and top + h <= 512 and block_left <= left and left + w <= 600
    for top, left, h, w in train:
        assert top + h <= block_top or left + w <= block_left
    areas = {name: np.mean([h * w for _, _, h, w in boxes]) / (512 * 600) for name, boxes in (("train", train),
                                                                                          ("test", test))}
    assert 0.02 <= areas["test"] <= 0.1 and areas["train"] == pytest.approx(areas["test"], rel=0.25)
    # the photographs differ: their crops' mean colours separate the classes well above chance
    means = torch.stack([train_x[train_y == label].mean(dim=(0, 2, 3)) for label in range(6)])
    nearest = torch.cdist(test_x.mean(dim=(2, 3)), means).argmin(1)
    assert (nearest == test_y).float().mean() > 0.4
    with pytest.raises(ValueError, match="0.02 to 0.5"):
        load_builtin("photos", test_fraction=0.8)


def test_decoder_crops():
    picture = np.zeros((100, 100, 3), np.uint8)
    picture[25:75, 25:75] = 255  # a white square in a black frame
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert decode_image(data, 20)[0, 0, 0] == 0  # the whole picture: the frame shows
    assert decode_image(data, 20, crop_pct=0.4).min() >= 250  # the centre 40% only
    generator = torch.Generator().manual_seed(0)
    crops = [decode_image(data, 20, random_crop=((0.08, 1.0), (0.75, 4 / 3), generator)) for _ in range(20)]
    assert all(crop.shape == (20, 20, 3) for crop in crops)
    assert len({crop.tobytes() for crop in crops}) > 15  # a different box each time
    assert decode_image(b"not an image", 20, random_crop=((0.08, 1.0), (0.75, 4 / 3), generator)) is None
    assert math.isclose(decode_image(data, 20, crop_pct=1.0).mean(), 255 / 4, rel_tol=0.15)
