"""BEiT's block-wise masking (Bao et al., 2022, Algorithm 1), with its defaults.

Blocks are added to an empty ``height x width`` mask until ``num_masking_patches`` are
masked. Each block: draw a target area ``s`` uniformly in ``[min_num_patches, budget]``
(``budget`` = what is still to mask, at most ``max_num_patches``) and a log-uniform aspect
ratio ``r`` in ``[min_aspect, 1 / min_aspect]``; the block is ``round(sqrt(s r))`` rows by
``round(sqrt(s / r))`` columns (it must be smaller than the grid both ways) at a uniform
position; it is accepted when the patches it newly masks number at least one and at most
the budget. Up to 10 draws per block; when none is accepted masking stops, so a mask can
end a little short of its target (never over it). BEiT: 75 of 14 x 14 patches (~40%),
blocks of at least 16.
"""

from __future__ import annotations

import math
import random

import numpy as np


class BlockMaskGenerator:
    def __init__(self, height: int, width: int | None = None, num_masking_patches: int = 75,
                 min_num_patches: int = 16, max_num_patches: int | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        width = height if width is None else width
        if not 0 < num_masking_patches <= height * width:
            raise ValueError(f"num_masking_patches must be in 1..{height * width} for a {height} x {width} grid, "
                             f"got {num_masking_patches}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.height, self.width = height, width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.blocks: list[tuple[int, int, int, int]] = []
        """The accepted blocks ``(top, left, rows, cols)`` of the last mask."""

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            rows, cols = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if rows >= self.height or cols >= self.width:
                continue
            top, left = rng.randint(0, self.height - rows), rng.randint(0, self.width - cols)
            window = mask[top: top + rows, left: left + cols]
            added = rows * cols - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                self.blocks.append((top, left, rows, cols))
                return added
        return 0

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        """A boolean ``[height, width]`` mask (True = masked)."""
        rng = rng or random.Random()
        mask = np.zeros((self.height, self.width), dtype=bool)
        self.blocks = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask

    def batch(self, size: int, rng: random.Random) -> np.ndarray:
        """``size`` masks, flattened: boolean ``[size, height * width]``."""
        return np.stack([self(rng).reshape(-1) for _ in range(size)])
