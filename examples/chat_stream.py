"""Streaming a multi-turn chat with the official openai client; usage arrives in a final chunk."""

import os

from openai import OpenAI

base_url = os.environ.get("BASE_URL", "http://localhost:8000/v1")
client = OpenAI(base_url=base_url, api_key=os.environ.get("API_KEY", "none"))

stream = client.chat.completions.create(
    model="demo",
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am InternVL."},
        {"role": "user", "content": "Tell me a story."},
    ],
    max_tokens=12,
    seed=7,
    stream=True,
    stream_options={"include_usage": True},
)
pieces = 0
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces += 1
    if chunk.choices and chunk.choices[0].finish_reason:
        print("finish_reason:", chunk.choices[0].finish_reason)
    if chunk.usage:
        print("usage:", chunk.usage.prompt_tokens, "+", chunk.usage.completion_tokens, "tokens")
print("content chunks:", pieces)
