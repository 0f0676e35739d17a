"""Gradio's stock OpenAI-compatible chat frontend (`gr.load_chat`), pointed at internvl-serve.

    python app.py --base-url http://127.0.0.1:8000/v1 --model demo --token KEY --port 7860

The token may also come from the OPENAI_API_KEY environment variable (keeps it off the command line).
"""

from __future__ import annotations

import argparse
import os

import gradio as gr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the server's OpenAI base URL, ending in /v1")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--token", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()

    demo = gr.load_chat(
        args.base_url,
        model=args.model,
        token=args.token,
        streaming=True,
        file_types=["image"],
        title="internvl-serve: demo model",
        description="Gradio's gr.load_chat against internvl-serve's /v1/chat/completions "
        "(the demo model has random weights: its answers are noise).",
    )
    demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=True)


if __name__ == "__main__":
    main()
