"""Grounding as data: ask where something is, get its boxes in the image's pixels, draw them.

InternVL answers grounding prompts with `<ref>label</ref><box>[[x1, y1, x2, y2]]</box>`, coordinates
0..1000 on each axis (the model cards' prompt is used below); the server returns each box in
`message.grounding` (label, image index, the 0..1000 box and the same box in pixels). A real
checkpoint is needed for real boxes: the demo model's random answer holds none, and the script
says so. Usage: python examples/grounding.py [IMAGE] [WHAT] (writes grounding.png).
"""

import base64
import os
import sys

from openai import OpenAI
from PIL import Image, ImageDraw

base_url = os.environ.get("BASE_URL", "http://localhost:8000/v1")
client = OpenAI(base_url=base_url, api_key=os.environ.get("API_KEY", "none"))
path = sys.argv[1] if len(sys.argv) > 1 else "docs/example.png"
what = sys.argv[2] if len(sys.argv) > 2 else "the largest shape"
model = client.models.list().data[0].id
with open(path, "rb") as file:
    image = base64.b64encode(file.read()).decode()

response = client.chat.completions.create(
    model=model,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {
                    "type": "text",
                    "text": "Please provide the bounding box coordinate of the region this sentence "
                    f"describes: <ref>{what}</ref>",
                },
            ],
        }
    ],
    max_tokens=64,
    temperature=0,
)
message = response.choices[0].message
print("answer:", repr(message.content))
boxes = (message.model_extra or {}).get("grounding") or []
if not boxes:
    print("no box in the answer (the demo model's answers are noise; serve a real checkpoint)")
    sys.exit(0)
picture = Image.open(path).convert("RGB")
draw = ImageDraw.Draw(picture)
for box in boxes:
    print(f"{box['label']!r}: {box['box']} of 1000 -> {box['box_pixels']} pixels")
    draw.rectangle(box["box_pixels"], outline=(255, 0, 0), width=3)
    draw.text((box["box_pixels"][0] + 4, box["box_pixels"][1] + 4), box["label"] or "", fill=(255, 0, 0))
picture.save("grounding.png")
print("wrote grounding.png")
