"""The vision tower and projector, run tile by tile and, when a step cannot afford a whole tile,
a few layers at a time.

InternViT encodes each 448x448 tile independently, so a prompt's image can be encoded over several
steps. A tile is `stages` steps of work: the patch embedding, each encoder layer, and the finish
(final norm, CLS drop, pixel shuffle, MLP projector). The scheduler asks for whole tiles when a
step can afford them (batched across images and requests) and for a slice of one tile's stages when
it cannot: on a CPU one tile of even a small tower takes longer than a decode step, and running
streams would otherwise wait for it whole. A tile in progress keeps its hidden state on its image.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from model_runtime.engine.scheduler import VisionTask
from model_runtime.engine.sequence import ImageSlot
from model_runtime.engine.vision_cache import VisionFeatureCache


class VisionEncoder:
    """Encodes the vision tasks of a step into their images' features."""

    def __init__(
        self, model: torch.nn.Module, dtype: torch.dtype, cache: VisionFeatureCache, *, max_batch_tiles: int
    ) -> None:
        self.model = model.model  # InternVLModel
        self.tower = self.model.vision_tower
        self.dtype = dtype
        self.cache = cache
        self.max_batch_tiles = max_batch_tiles
        self.device = next(self.tower.parameters()).device
        self.output_device = self.model.language_model.get_input_embeddings().weight.device
        layers = len(self.tower.encoder.layer)
        feature_layer = self.model.config.vision_feature_layer
        # Layers to run: all, or up to the hidden state the config selects (hidden_states[k]).
        self.final_norm = feature_layer == -1
        self.layers = layers if self.final_norm else feature_layer % (layers + 1)
        self.stages = self.layers + 2  # embedding, layers, finish
        self.stage_shares = self._stage_flops()

    def _stage_flops(self) -> tuple[float, ...]:
        """Multiply-adds of each stage for one tile, as the scheduler's weights for slicing a tile
        (measured on the small model, CPU: embedding 3 ms, each layer 17 ms, finish 2.5 ms; the
        counts give 0.3, 2.7 and 0.4 GFLOP)."""
        vision = self.model.config.vision_config
        width, inner = vision.hidden_size, vision.intermediate_size
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        patches = (size // patch) ** 2
        tokens = patches + 1  # and the CLS token
        embedding = patches * 3 * patch * patch * width
        layer = tokens * (4 * width * width + 2 * width * inner) + 2 * tokens * tokens * width
        ratio = self.model.config.downsample_ratio
        out = int(patches * ratio * ratio)
        text = self.model.config.text_config.hidden_size
        finish = out * (int(width / (ratio * ratio)) * text + text * text)
        return (float(embedding), *([float(layer)] * self.layers), float(finish))

    def _run(self, hidden: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Stages [first, last) on `hidden` (pixels before stage 0; features after the last)."""
        for stage in range(first, last):
            if stage == 0:
                hidden = self.tower.embeddings(hidden.to(self.device, self.dtype))
            elif stage <= self.layers:
                hidden = self.tower.encoder.layer[stage - 1](hidden)
            else:
                hidden = self._finish(hidden)
        return hidden

    def _finish(self, hidden: torch.Tensor) -> torch.Tensor:
        # As get_image_features after the tower: [tiles, 1 + patches, width] -> [tiles, T, hidden]
        if self.final_norm:
            hidden = self.tower.layernorm(hidden)
        hidden = hidden[:, 1:, :]  # the "default" strategy drops the CLS token
        side = int(hidden.shape[1] ** 0.5)
        hidden = hidden.reshape(hidden.shape[0], side, side, -1)
        hidden = self.model.pixel_shuffle(hidden, scale_factor=self.model.config.downsample_ratio)
        hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        return self.model.multi_modal_projector(hidden).to(self.output_device)

    @torch.inference_mode()
    def encode(self, tasks: Seq[VisionTask]) -> None:
        """Run the tasks; whole images already in the vision cache are taken from it instead."""
        whole: list[VisionTask] = []
        for task in tasks:
            image = task.image
            if (
                image.tiles_ready == 0
                and image.stage == 0
                and (cached := self.cache.get(image.key)) is not None
            ):
                image.features, image.pixel_values, image.tiles_ready = cached, None, image.num_tiles
            elif task.stages is not None:
                self._encode_slice(task)
            elif task.start >= image.tiles_ready:
                whole.append(task)
        if whole:
            pixels = torch.cat([t.image.pixel_values[t.start : t.end] for t in whole])
            features = torch.cat(
                [
                    self._run(pixels[i : i + self.max_batch_tiles], 0, self.stages)
                    for i in range(0, pixels.shape[0], self.max_batch_tiles)
                ]
            )  # [tiles, T, hidden]
            offset = 0
            for task in whole:
                tiles = task.end - task.start
                self._store(task.image, task.start, features[offset : offset + tiles])
                offset += tiles

    def _encode_slice(self, task: VisionTask) -> None:
        image, (first, last) = task.image, task.stages
        assert task.end == task.start + 1 and first == image.stage, "slices continue the tile in progress"
        hidden = image.partial if first > 0 else image.pixel_values[task.start : task.end]
        hidden = self._run(hidden, first, last)
        if last < self.stages:
            image.partial, image.stage = hidden, last
            return
        image.partial, image.stage = None, 0
        self._store(image, task.start, hidden)

    def _store(self, image: ImageSlot, start: int, features: torch.Tensor) -> None:
        """Features [tiles, T, hidden] of tiles start.. of the image; a complete image is cached."""
        per_tile = features.shape[1]
        if image.features is None:
            image.features = features.new_empty((image.num_tiles * per_tile, features.shape[-1]))
        image.features[start * per_tile : (start + features.shape[0]) * per_tile] = features.flatten(0, 1)
        image.tiles_ready = start + features.shape[0]
        if image.complete:
            image.pixel_values = None
            self.cache.put(image.key, image.features)
