"""Image preprocessing speed: the model cards' reference path vs model_runtime.inputs.image.load_image.

Run from the repository root:  python -m benchmarks.preprocess  [--runs N]

For 640x480, 1920x1080 and 4000x3000 JPEG and PNG images (synthetic, seeded) it prints the median
time per image of the reference (tests/reference.py: PIL decode + convert, dynamic_preprocess,
per-tile ToTensor and Normalize, restated without torchvision) and of load_image, the speed-up,
and the largest absolute difference between the two tensors (0 means identical). For JPEG it also
times the opt-in fast_jpeg_draft path and prints how far its pixels move.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from model_runtime.inputs.image import load_image
from tests.reference import ref_load_image  # the model cards' code, also what the tests compare with

SIZES = [(640, 480), (1920, 1080), (4000, 3000)]
FORMATS = ["JPEG", "PNG"]


# --- harness -------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with soft blobs and mild noise: compresses roughly like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    channels = [255 * u, 255 * v, 127 + 100 * np.sin(6.28 * (u * 3 + v * 2))]
    for _ in range(12):
        cx, cy, r = rng.random(), rng.random(), 0.03 + 0.1 * rng.random()
        blob = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r)) * rng.uniform(-120, 120)
        channels[rng.integers(0, 3)] += blob
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def median_ms(fns: dict[str, Callable[[], torch.Tensor]], runs: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Median milliseconds of each function, timed in turn within each round so that a noisy machine
    slows all of them alike; with the tensor each returned (after a warm-up call)."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]) * 1000, results[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=0, help="timed runs per case (default: by size)")
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, max_tiles {args.max_tiles}")
    header = f"{'image':<16}{'KiB':>7}{'tiles':>6}{'ref ms':>9}{'ours ms':>9}{'x':>6}"
    header += f"{'parallel':>10}{'x':>6}{'max|diff|':>11}"
    print(header)
    drafts = []
    tiles = args.max_tiles
    for width, height in SIZES:
        image = synthetic_image(width, height)
        runs = args.runs or (15 if width * height < 1e6 else 9 if width * height < 4e6 else 7)
        for fmt in FORMATS:
            data = encode(image, fmt)
            fns = {
                "ref": lambda d=data: ref_load_image(d, max_num=tiles),
                "ours": lambda d=data: load_image(d, max_tiles=tiles),
                "parallel": lambda d=data: load_image(d, max_tiles=tiles, parallel=True),
            }
            if fmt == "JPEG":
                fns["draft"] = lambda d=data: load_image(
                    d, max_tiles=tiles, fast_jpeg_draft=True, parallel=True
                )
            timed = median_ms(fns, runs)
            (ref_ms, ref), (ours_ms, ours), (par_ms, par) = timed["ref"], timed["ours"], timed["parallel"]
            diff = max((ours - ref).abs().max().item(), (par - ref).abs().max().item())
            print(
                f"{f'{width}x{height} {fmt}':<16}{len(data) // 1024:>7}{ref.shape[0]:>6}"
                f"{ref_ms:>9.1f}{ours_ms:>9.1f}{ref_ms / ours_ms:>6.2f}"
                f"{par_ms:>10.1f}{ref_ms / par_ms:>6.2f}{diff:>11.2g}"
            )
            if "draft" in timed:
                fast_ms, fast = timed["draft"]
                deviation = (fast - ref).abs()
                drafts.append((f"{width}x{height}", ref_ms, fast_ms, deviation, fast.shape == ref.shape))
    print("\nopt-in fast_jpeg_draft=True (+parallel): JPEG decoded at a reduced DCT scale")
    print(f"{'image':<16}{'ref ms':>9}{'fast ms':>9}{'x':>6}{'max|dev|':>10}{'mean|dev|':>11}  (normalized)")
    for name, ref_ms, fast_ms, deviation, same_shape in drafts:
        print(
            f"{name:<16}{ref_ms:>9.1f}{fast_ms:>9.1f}{ref_ms / fast_ms:>6.2f}"
            f"{deviation.max().item():>10.3f}{deviation.mean().item():>11.4f}"
            + ("" if same_shape else "  SHAPE DIFFERS")
        )


if __name__ == "__main__":
    main()
