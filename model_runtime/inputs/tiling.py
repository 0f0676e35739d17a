"""InternVL's tiling: the reference's grid choice, tiles and thumbnail as a normalized tensor.

Pure functions (no server, no model). Pixel values equal the reference `dynamic_preprocess` plus the
model cards' per-tile transform (PIL bicubic resize, row-major tiles, a thumbnail when there is more
than one tile, ImageNet normalization), computed without cropping each tile in PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model_runtime.errors import InvalidRequestError
from model_runtime.inputs import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """The reference's grid choice: closest aspect ratio; on a tie a later grid wins if the image is big."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols * rows <= max_tiles, in the reference's order."""
    # The reference sorts a set by tile count, so grids with equal counts keep the set's iteration
    # order, which decides ties. That order depends only on the order in which distinct pairs are
    # first added; its triple loop first meets (i, j) at n = max(min_tiles, i, j), in (i, j) order
    # within each n. Adding pairs in that order rebuilds the same set in O(max_tiles log max_tiles)
    # instead of the reference's O(max_tiles**3).
    pairs = [
        (i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles // i + 1) if i * j >= min_tiles
    ]
    pairs.sort(key=lambda p: (max(min_tiles, p[0], p[1]), p[0], p[1]))
    return sorted(set(pairs), key=lambda p: p[0] * p[1])


def check_tiling(min_tiles: int, max_tiles: int, image_size: int) -> None:
    if min_tiles < 1:
        raise InvalidRequestError(f"min_tiles must be at least 1, got {min_tiles}", param="min_tiles")
    if max_tiles < min_tiles:
        raise InvalidRequestError(
            f"max_tiles ({max_tiles}) must be at least min_tiles ({min_tiles})", param="max_tiles"
        )
    if image_size < 1:
        raise InvalidRequestError(f"image_size must be positive, got {image_size}", param="image_size")


def choose_grid(
    width: int, height: int, *, min_tiles: int, max_tiles: int, image_size: int
) -> tuple[int, int]:
    """The (cols, rows) tile grid the reference picks for an image of this size."""
    check_tiling(min_tiles, max_tiles, image_size)
    ratios = candidate_grids(min_tiles, max_tiles)
    return find_closest_aspect_ratio(width / height, ratios, width, height, image_size)


def dynamic_preprocess(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """The reference tiling as PIL images: row-major crops of the resized image, then the thumbnail."""
    cols, rows = choose_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def _normalize_(pixels: torch.Tensor) -> torch.Tensor:
    # pixels: [..., 3, H, W] float32 holding 0..255. Same float32 operations, in the same order, as
    # torchvision's ToTensor (x / 255) then Normalize ((x - mean) / std), so the values are identical.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.div_(255).sub_(mean).div_(std)


def _hwc_uint8(image: Image.Image) -> torch.Tensor:
    # A writable copy: torch refuses to wrap the read-only buffer np.asarray(image) gives without a warning.
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)


def tiles_to_tensor(tiles: Sequence[Image.Image]) -> torch.Tensor:
    """Equal-size tiles -> [N, 3, S, S] float32, normalized as the reference's per-tile transform."""
    arrays = np.stack([np.asarray(t if t.mode == "RGB" else t.convert("RGB"), dtype=np.uint8) for t in tiles])
    # arrays: [N, S, S, 3] uint8
    pixels = torch.empty((arrays.shape[0], 3, arrays.shape[1], arrays.shape[2]), dtype=torch.float32)
    pixels.copy_(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    return _normalize_(pixels)


class _TileTensor:
    """[tiles (+ thumbnail), 3, S, S] float32, filled piece by piece from the resized grid image and
    the thumbnail, each piece normalized as the reference's per-tile transform normalizes it."""

    def __init__(self, cols: int, rows: int, image_size: int, use_thumbnail: bool) -> None:
        self.size, self.cols, self.rows = image_size, cols, rows
        self.n = cols * rows
        self.thumbnail = use_thumbnail and self.n != 1
        self.pixels = torch.empty(
            (self.n + int(self.thumbnail), 3, image_size, image_size), dtype=torch.float32
        )

    def fill_grid(self, left: int, top: int, piece: Image.Image) -> None:
        """A piece of the grid image made of whole tiles, its top-left corner at (left, top)."""
        size = self.size
        r, c, nr, nc = top // size, left // size, piece.height // size, piece.width // size
        hwc = _hwc_uint8(piece).view(nr, size, nc, size, 3).permute(0, 2, 4, 1, 3)
        tiles = self.pixels[: self.n].view(self.rows, self.cols, 3, size, size)
        _normalize_(tiles[r : r + nr, c : c + nc].copy_(hwc))

    def fill_thumbnail(self, left: int, top: int, piece: Image.Image) -> None:
        region = self.pixels[self.n, :, top : top + piece.height, left : left + piece.width]
        _normalize_(region.copy_(_hwc_uint8(piece).permute(2, 0, 1)))


def grid_tensor(
    image: Image.Image, cols: int, rows: int, image_size: int, use_thumbnail: bool
) -> torch.Tensor:
    # Equals tiles_to_tensor(dynamic_preprocess(image)) for that grid, but resizes once and slices the
    # tiles out of one array instead of cropping and converting each tile in PIL.
    out = _TileTensor(cols, rows, image_size, use_thumbnail)
    out.fill_grid(0, 0, image.resize((cols * image_size, rows * image_size), resize.BICUBIC))
    if out.thumbnail:
        out.fill_thumbnail(0, 0, image.resize((image_size, image_size), resize.BICUBIC))
    return out.pixels


class _ParallelTiles:
    """The tensor of _grid_tensor, with both resizes cut into strips on the shared resize pool
    (model_runtime/inputs/resize.py says why the pixels stay identical). The grid's last pass is cut
    at tile boundaries, so each strip fills and normalizes whole tiles on the thread that made it."""

    def __init__(
        self, image: Image.Image, cols: int, rows: int, image_size: int, use_thumbnail: bool
    ) -> None:
        self.out = _TileTensor(cols, rows, image_size, use_thumbnail)
        pool, workers = resize.shared_pool(), resize.pool_size()
        # Both first passes are queued before either resize waits for its own.
        grid = resize.StripResize(pool, image, (cols * image_size, rows * image_size), workers)
        self.jobs = [(grid, self.out.fill_grid, image_size)]
        if self.out.thumbnail:
            thumb = resize.StripResize(pool, image, (image_size, image_size), workers)
            self.jobs.append((thumb, self.out.fill_thumbnail, 1))

    def result(self) -> torch.Tensor:
        pending = []
        for job, fill, align in self.jobs:
            pending += job.finish(fill, align)
        for future in pending:
            future.result()
        return self.out.pixels


def grid_tensor_parallel(
    image: Image.Image, cols: int, rows: int, image_size: int, use_thumbnail: bool
) -> torch.Tensor:
    return _ParallelTiles(image, cols, rows, image_size, use_thumbnail).result()
