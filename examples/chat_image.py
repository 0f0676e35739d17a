"""One image and a question, with the official openai client (non-streaming)."""

import base64
import os

from openai import OpenAI

base_url = os.environ.get("BASE_URL", "http://localhost:8000/v1")
client = OpenAI(base_url=base_url, api_key=os.environ.get("API_KEY", "none"))
with open("docs/example.png", "rb") as file:
    image = base64.b64encode(file.read()).decode()

response = client.chat.completions.create(
    model="demo",
    messages=[
        {
            "role": "user",
            "content": [
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:image/png;base64,{image}", "detail": "low"},
                },
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ],
    max_tokens=16,
    temperature=0,
)
print(repr(response.choices[0].message.content), response.choices[0].finish_reason)
print("prompt tokens:", response.usage.prompt_tokens, "completion tokens:", response.usage.completion_tokens)
