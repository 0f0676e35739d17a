"""InternVL's reference preprocessing, as the model cards write it (`build_transform`,
`find_closest_aspect_ratio`, `dynamic_preprocess`, `load_image`, `get_index`, `load_video`), with
torchvision's ToTensor/Normalize restated in PIL + torch (the same float32 operations; torchvision
does not install beside the CPU torch wheel).

Kept apart from model_runtime on purpose: tests check our preprocessing against it, and
benchmarks/preprocess.py times it as the baseline.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from model_runtime.inputs.tiling import IMAGENET_MEAN, IMAGENET_STD


def ref_transform(img: Image.Image, input_size: int) -> torch.Tensor:
    img = img.convert("RGB") if img.mode != "RGB" else img
    # T.Resize((S, S), BICUBIC) on an S x S tile: PIL returns an unchanged copy.
    img = img.resize((input_size, input_size), Image.Resampling.BICUBIC)
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)  # ToTensor
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
    return (t - mean[:, None, None]) / std[:, None, None]  # Normalize


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (kept as written in the reference)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def ref_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = ref_target_ratios(min_num, max_num)
    target_aspect_ratio = ref_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def ref_pixels(image, input_size=448, max_num=12, min_num=1):
    images = ref_dynamic_preprocess(
        image, min_num=min_num, image_size=input_size, use_thumbnail=True, max_num=max_num
    )
    return torch.stack([ref_transform(tile, input_size) for tile in images])


def ref_load_image(data: bytes, input_size=448, max_num=12):
    return ref_pixels(Image.open(io.BytesIO(data)).convert("RGB"), input_size, max_num)


def ref_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array(
        [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]
    )
    return frame_indices


def ref_load_video(video_path, bound=None, input_size=448, max_num=1, num_segments=32):
    from decord import VideoReader, cpu

    vr = VideoReader(video_path, ctx=cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    pixel_values_list, num_patches_list = [], []
    frame_indices = ref_get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    for frame_index in frame_indices:
        img = Image.fromarray(vr[frame_index].asnumpy()).convert("RGB")
        img = ref_dynamic_preprocess(img, image_size=input_size, use_thumbnail=True, max_num=max_num)
        pixel_values = torch.stack([ref_transform(tile, input_size) for tile in img])
        num_patches_list.append(pixel_values.shape[0])
        pixel_values_list.append(pixel_values)
    return torch.cat(pixel_values_list), num_patches_list
