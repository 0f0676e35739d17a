"""Write the PNG that the frontend demo uploads: a small, recognisable test card.

python make_image.py OUT.png
"""

from __future__ import annotations

import sys

from PIL import Image, ImageDraw


def test_card(width: int = 320, height: int = 224) -> Image.Image:
    image = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    bars = [(230, 57, 70), (241, 143, 1), (255, 209, 102), (6, 214, 160), (17, 138, 178), (7, 59, 76)]
    bar_w = width // len(bars)
    for i, colour in enumerate(bars):
        draw.rectangle([i * bar_w, 0, (i + 1) * bar_w - 1, height // 2], fill=colour)
    draw.ellipse([width // 2 - 40, height // 2 - 10, width // 2 + 40, height // 2 + 70], fill=(20, 20, 20))
    draw.ellipse([width // 2 - 20, height // 2 + 10, width // 2 + 20, height // 2 + 50], fill=(255, 255, 255))
    draw.text((10, height - 22), "internvl-serve frontend demo", fill=(20, 20, 20))
    return image


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.png")
    test_card().save(sys.argv[1], format="PNG")


if __name__ == "__main__":
    main()
