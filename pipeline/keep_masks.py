"""Kept masks as the result rows store them (`--keep-masks`): one bit per visual token, packed.

A 7B row with a 1280×960 image has 1,564 visual tokens: 196 bytes packed, against 1.5 KiB as a
list of ints, so a job can keep every row's mask. Bits follow the engine's order: image by image,
each image's merged patch grid (t, h / 2, w / 2) in raster order.
"""

from __future__ import annotations

import numpy as np

SPATIAL_MERGE = 2  # Qwen2.5-VL and Qwen3-VL both merge 2×2 patches into one visual token


def pack(mask: list[int]) -> bytes:
    """1 per kept visual token → bytes, most significant bit first (numpy.packbits)."""
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes()


def token_grids(image_grid_thw: list[int]) -> list[tuple[int, int, int]]:
    """Each image's visual-token grid (t, h, w) from the flattened patch grids (t, h, w, t, h, w…)."""
    if image_grid_thw is None or len(image_grid_thw) % 3:
        raise ValueError(f"image_grid_thw must be patch-grid triples, not {image_grid_thw!r:.60}")
    if any(n <= 0 for n in image_grid_thw) or any(n % SPATIAL_MERGE for i, n in enumerate(image_grid_thw) if i % 3):
        raise ValueError(f"image_grid_thw {image_grid_thw!r:.60} is not a grid of merged patches")
    return [
        (t, h // SPATIAL_MERGE, w // SPATIAL_MERGE)
        for t, h, w in zip(image_grid_thw[0::3], image_grid_thw[1::3], image_grid_thw[2::3])
    ]


def unpack(kept_mask: bytes, image_grid_thw: list[int]) -> list[np.ndarray]:
    """The packed mask as one boolean array per image, shaped like its token grid (t, h, w). Rows
    that were not pruned, or failed, have no mask (None): a ValueError, like a mask that does not fit."""
    if kept_mask is None:
        raise ValueError("the row has no kept mask (not pruned, failed, or run without --keep-masks)")
    grids = token_grids(image_grid_thw)
    sizes = [t * h * w for t, h, w in grids]
    if len(kept_mask) != (sum(sizes) + 7) // 8:
        raise ValueError(f"a kept mask of {len(kept_mask)} bytes does not fit grids holding {sum(sizes)} tokens")
    bits = np.unpackbits(np.frombuffer(kept_mask, dtype=np.uint8), count=sum(sizes)).astype(bool)
    bounds = np.cumsum([0, *sizes])
    return [bits[a:b].reshape(grid) for a, b, grid in zip(bounds[:-1], bounds[1:], grids)]
