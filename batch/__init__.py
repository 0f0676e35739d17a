"""Offline batch inference: OpenAI Batch JSONL in, OpenAI Batch JSONL out, over the server's own app.

jsonl.py    input rows, the output file (whole lines, resume), output lines
runner.py   the engine and the FastAPI app in-process; rows posted through httpx.ASGITransport
progress.py a progress bar on a terminal, periodic log lines elsewhere
cli.py      `internvl-batch`: one process, or Ray Data replicas (ray_runner.py)
"""
