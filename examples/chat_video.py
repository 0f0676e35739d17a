"""A video (sampled to 8 frames, one 448x448 tile each, as the model cards do) and a question."""

import base64
import io
import os

import av  # only to make a small test video here; pip install av
import numpy as np
from openai import OpenAI

buffer = io.BytesIO()
with av.open(buffer, mode="w", format="mp4") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    for i in range(30):
        frame = np.full((120, 160, 3), (i * 8) % 256, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
video = base64.b64encode(buffer.getvalue()).decode()

base_url = os.environ.get("BASE_URL", "http://localhost:8000/v1")
client = OpenAI(base_url=base_url, api_key=os.environ.get("API_KEY", "none"))
response = client.chat.completions.create(
    model="demo",
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video}"}},
                {"type": "text", "text": "What happens in the video?"},
            ],
        }
    ],
    max_tokens=8,
    temperature=0,
)
print("prompt tokens:", response.usage.prompt_tokens, "(8 frames x 256 image tokens + text)")
print("finish_reason:", response.choices[0].finish_reason)
