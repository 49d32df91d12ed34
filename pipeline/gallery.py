"""The report's gallery: a few rows, from the least kept to the most, each image drawn with the
visual tokens pruning kept lit and the pruned ones dimmed, so a reader sees what the model looked at.

Images are read back from the rows' URIs and inlined as PNG, so the page stays one file. A
picture that cannot be read back (deleted, inside a `datasets` folder, too large) becomes a note.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import keep_masks
from pipeline.failures import describe
from pipeline.prepare import decode_image
from pipeline.storage import StorageOptions, read_bytes
from pipeline.summary import keep_ratios, pruned_rows

LONG_SIDE = 320  # the most pixels a picture spans on its long side, unless its grid needs MIN_CELL
MIN_CELL = 2  # pixels per visual token at least, so that a large grid's mask stays visible
DIM = 0.3  # a pruned token's pixels are multiplied by this
RESAMPLE = Image.Resampling.BICUBIC
NO_MASKS = "run the job with --keep-masks to see what was kept"
NOTHING_PRUNED = "no row was pruned, so nothing was left out"
NONE_ASKED = "no gallery: the report was asked for none (--gallery 0)"
GRID_SLACK = 1.0  # tokens either side: the processor rounds each side to whole tokens (Qwen's smart_resize)


@dataclass
class Limits:
    """What the job would read of an image; the report reads no more."""

    max_bytes: int = 64 * 1024**2
    max_pixels: int = 64_000_000


@dataclass
class Picture:
    """One image of a row: drawn as a PNG data URI, or a note saying why not."""

    uri: str
    src: str | None = None
    note: str | None = None
    cell: int = 0  # pixels per visual token along each side
    mask: np.ndarray | None = None  # the first frame's (h, w) token grid, True = kept

    @property
    def bits(self) -> str:
        """The mask in raster order as 0s and 1s, for the page's data attribute (tests check pixels by it)."""
        return "".join("1" if kept else "0" for kept in self.mask.ravel())


@dataclass
class Entry:
    """A row as the gallery shows it."""

    id: str
    question: str
    answer: str
    unpruned_answer: str | None  # control rows only
    references: list[str]
    metric: str | None
    score: float | None
    kept: int
    tokens: int
    pictures: list[Picture] = field(default_factory=list)

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.tokens


@dataclass
class Gallery:
    entries: list[Entry]
    note: str | None  # why the gallery shows no pictures


def build_gallery(table: pa.Table, storage: StorageOptions, size: int = 8, limits: Limits | None = None) -> Gallery:
    """About `size` answered, pruned rows spread over their keep ratios, the lowest and highest among
    them; rows with a kept mask are preferred, since only they can show what was kept."""
    if size == 0:
        return Gallery([], NONE_ASKED)
    candidates = pruned_rows(table)
    if not candidates.num_rows:
        return Gallery([], NOTHING_PRUNED)
    masked = candidates.filter(pc.is_valid(candidates.column("kept_mask")))
    rows = masked if masked.num_rows else candidates
    ratios = keep_ratios(rows)
    chosen = stratified(ratios.to_pylist(), rows.column("id").to_pylist(), size)
    has_masks = bool(masked.num_rows)
    chosen_rows = rows.take(pa.array(chosen, pa.int64())).to_pylist()  # typed: an empty list is not `null`
    entries = [_entry(row, storage, limits or Limits(), has_masks) for row in chosen_rows]
    return Gallery(entries, None if has_masks else NO_MASKS)


def stratified(ratios: list[float], ids: list[str], size: int) -> list[int]:
    """Indices of `size` rows evenly spaced along the keep-ratio order (ties by id), so the lowest
    and the highest ratio are always shown and the rest spread between them."""
    order = sorted(range(len(ratios)), key=lambda i: (ratios[i], ids[i]))
    if size >= len(order):
        return order
    positions = np.round(np.linspace(0, len(order) - 1, size)).astype(int)
    return [order[p] for p in positions]  # spaced at least 1 apart, so no position repeats


def fits_grid(width: int, height: int, grid: tuple[int, int]) -> bool:
    """Whether an image of `width` × `height` pixels can be the one the job saw as a token grid
    (h, w): some one scale brings both sides within GRID_SLACK tokens of the grid, as the
    processor's resize (aspect ratio kept, each side rounded to whole tokens) does. An image
    replaced at its URI by one of another shape cannot, and drawn on the grid it would be stretched."""
    h, w = grid
    # Scales (tokens per pixel) that fit each side, as open intervals; the image fits if they meet.
    return (w - GRID_SLACK) * height < (h + GRID_SLACK) * width and (h - GRID_SLACK) * width < (w + GRID_SLACK) * height


def draw(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, int]:
    """The image resized to whole cells of its (h, w) token grid, pruned cells dimmed; returns it and the cell size."""
    h, w = mask.shape
    cell = max(MIN_CELL, LONG_SIDE // max(h, w))
    pixels = np.asarray(image.convert("RGB").resize((w * cell, h * cell), RESAMPLE)).copy()
    pruned = ~np.repeat(np.repeat(mask, cell, axis=0), cell, axis=1)
    pixels[pruned] = (pixels[pruned] * DIM).astype(np.uint8)
    return Image.fromarray(pixels), cell


def _entry(row: dict, storage: StorageOptions, limits: Limits, draw_pictures: bool) -> Entry:
    return Entry(
        id=row["id"],
        question=row["question"],
        answer=row["answer"],
        unpruned_answer=row["control_unpruned_answer"],
        references=row["references"] or [],
        metric=row["metric"],
        score=row["score"],
        kept=row["n_visual_kept"],
        tokens=row["n_visual_tokens"],
        pictures=_pictures(row, storage, limits) if draw_pictures else [],
    )


def _pictures(row: dict, storage: StorageOptions, limits: Limits) -> list[Picture]:
    """Each image of the row with its mask; a mask that does not fit the row's grids is a note on every image."""
    try:
        masks = keep_masks.unpack(row["kept_mask"], row["image_grid_thw"] or [])
        if len(masks) != len(row["images"]):
            raise ValueError(f"{len(masks)} mask grids for {len(row['images'])} images")
    except ValueError as e:
        return [Picture(uri, note=f"the kept mask does not fit the images: {e}") for uri in row["images"]]
    return [_picture(uri, mask[0], storage, limits) for uri, mask in zip(row["images"], masks)]


def _picture(uri: str, mask: np.ndarray, storage: StorageOptions, limits: Limits) -> Picture:
    """The image read back and drawn, or a note: a missing picture never fails the report."""
    try:
        image = decode_image(read_bytes(uri, storage, limits.max_bytes), uri, limits.max_pixels)
    except Exception as e:  # any reason the image is gone or unreadable now
        code, _ = describe(e)
        return Picture(uri, note=f"image not shown ({code.replace('_', ' ')}): {uri}")
    if not fits_grid(image.width, image.height, mask.shape):
        h, w = mask.shape
        grid = f"{image.width}×{image.height} for a {w}×{h} token grid"
        return Picture(uri, note=f"the image at {uri} no longer matches the row's grid ({grid}); not shown")
    drawn, cell = draw(image, mask)
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return Picture(uri, src=src, cell=cell, mask=mask)
