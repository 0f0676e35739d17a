"""InternVL's grounding answers as data: `<ref>label</ref><box>[[x1, y1, x2, y2]]</box>` spans.

InternVL is trained to locate what it names with boxes whose coordinates are normalized to
0..1000 on each axis of the image (the model cards' grounding examples). The answer's text is
kept as the model wrote it; alongside, the message carries each box with its label, the image it
refers to and its coordinates in that image's pixels. A box refers to the last image of the
conversation, as in the model cards' single-image grounding prompts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from PIL import Image

from server.protocol import GroundingBox

_SPAN = re.compile(r"(?:<ref>(?P<label>.*?)</ref>\s*)?<box>(?P<boxes>.*?)</box>", re.DOTALL)
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_QUAD = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_SCALE = 1000
_EXIF_ORIENTATION = 0x0112


def find_boxes(text: str, images: Sequence[bytes]) -> list[GroundingBox] | None:
    """Every box in `text` (None if there is none), placed on the last of `images`."""
    if "<box>" not in text:
        return None
    size = image_size(images[-1]) if images else None
    found: list[GroundingBox] = []
    for span in _SPAN.finditer(text):
        label = span.group("label")
        for quad in _QUAD.finditer(span.group("boxes")):
            box = [float(v) for v in quad.groups()]
            pixels = None
            if size is not None:
                width, height = size
                pixels = [
                    round(box[0] * width / _SCALE),
                    round(box[1] * height / _SCALE),
                    round(box[2] * width / _SCALE),
                    round(box[3] * height / _SCALE),
                ]
            found.append(
                GroundingBox(
                    label=label.strip() if label is not None else None,
                    image_index=len(images) - 1 if images else None,
                    box=[int(v) if v.is_integer() else v for v in box],
                    box_pixels=pixels,
                )
            )
    return found or None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the model saw the image (EXIF rotation applied), from its header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - the image was decoded before; this only reads its header
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
