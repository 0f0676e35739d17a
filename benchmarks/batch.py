"""Offline batch vs the HTTP server: the same image requests through `internvl-batch`'s path (the
engine and the server's app in-process, rows read from a JSONL file and answers written to one) and
through `internvl-serve` over loopback HTTP at several client concurrencies, measured in one run:

    python benchmarks/batch.py --size small --requests 256 --repeats 3

Both sides run the same random checkpoint (`model_runtime.loading.tiny`, --size/--seed) with the same
server settings (defaults, or --server-args for both), both engines warm (loaded and warmed up before
any timing; the batch CLI's model load is reported apart). Every request is a non-streaming chat
completion with one image of its own (a --image-size JPEG as a data: URI, `detail` --detail),
greedy, `ignore_eos` with --max-tokens, so every answer has the same length. No two runs send the
same image (the vision-feature cache would answer repeats). Runs alternate between the two sides,
repeat by repeat, so that a slow spell of the machine hits both; the report gives each side's mean,
min and max over the repeats, the HTTP side at its best concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# benchmarks/ is a directory of scripts, not a package: `python benchmarks/batch.py` puts it on sys.path.
from _loadgen import RequestOptions, _data_uri, synthetic_image
from _peers import OFFLINE_ENV, REPO, Peer, free_port, running

# The repository first: `batch` must be the package, not this script (which sys.path[0] also holds).
sys.path.insert(0, str(REPO))

QUESTION = "Describe this picture in detail."
MODEL_NAME = "bench"


@dataclass
class Run:
    """One timed pass over the requests."""

    side: str  # "batch" or "http c=N"
    repeat: int
    seconds: float
    ok: int
    failed: int
    output_tokens: int

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def tps(self) -> float:
        return self.output_tokens / self.seconds


def build_bodies(args: argparse.Namespace, run: int, count: int) -> list[bytes]:
    """Request bodies of run `run`: images seeded by (seed, run * count + i), distinct across runs."""
    width, height = args.image_size
    bodies = []
    for i in range(count):
        image = synthetic_image(args.seed, run * 100_000 + i, width, height, "JPEG")
        content = [
            {
                "type": "image_url",
                "image_url": {"url": _data_uri(image, "image/jpeg"), "detail": args.detail},
            },
            {"type": "text", "text": QUESTION},
        ]
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


def usage_tokens(body: Any) -> int:
    try:
        return int(body["usage"]["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        return 0


# -- the batch side: internvl-batch's own path, in this process ------------------------------------


async def batch_run(
    app: Any, bodies: list[bytes], work: Path, name: str, concurrency: int, repeat: int
) -> Run:
    """Rows written to a JSONL file, read back by the batch reader, answered into an output file."""
    from batch.jsonl import Done, OutputWriter, read_rows  # noqa: I001  (after sys.path is set)
    from batch.runner import run_rows

    source = work / f"{name}.jsonl"
    with source.open("wb") as file:
        for i, body in enumerate(bodies):
            row = b'{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":%s}\n' % (i, body)
            file.write(row)
    out = work / f"{name}.out.jsonl"
    out.unlink(missing_ok=True)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    with OutputWriter(out) as writer:

        def write(record: dict[str, Any]) -> None:
            writer.write(record)
            records.append(record)

        await run_rows(app, read_rows(source, Done(), max_line_bytes=1 << 28), write, concurrency=concurrency)
    seconds = time.perf_counter() - started
    ok = [r for r in records if r["response"] and r["response"]["status_code"] == 200]
    tokens = sum(usage_tokens(r["response"]["body"]) for r in ok)
    return Run("batch", repeat, seconds, len(ok), len(records) - len(ok), tokens)


# -- the HTTP side: internvl-serve, non-streaming requests at fixed concurrency --------------------


async def http_run(url: str, bodies: list[bytes], concurrency: int, repeat: int, timeout_s: float) -> Run:
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:

        async def one(body: bytes) -> tuple[bool, int]:
            async with slots:
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError:
                    return False, 0
            if response.status_code != 200:
                return False, 0
            return True, usage_tokens(response.json())

        started = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        seconds = time.perf_counter() - started
    ok = sum(1 for good, _ in results if good)
    return Run(f"http c={concurrency}", repeat, seconds, ok, len(bodies) - ok, sum(t for _, t in results))


# -- the run ------------------------------------------------------------------------------------------


def cli_load_time(checkpoint: str, server_args: list[str], work: Path, body: bytes) -> float:
    """Wall time of the real `internvl-batch` on one row: its start-up and model load, for the report."""
    source = work / "one.jsonl"
    source.write_bytes(b'{"custom_id":"one","method":"POST","url":"/v1/chat/completions","body":%s}\n' % body)
    out = work / "one.out.jsonl"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "batch.cli", "--model", checkpoint, "--served-model-name", MODEL_NAME,
               "--input", str(source), "--output", str(out), "--log-level", "warning",
               *server_args]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"internvl-batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - started


def _env() -> dict[str, str]:
    import os

    return {**os.environ, **OFFLINE_ENV}


async def measure(args: argparse.Namespace, checkpoint: str, work: Path) -> list[Run]:
    from batch.runner import InProcessApp, default_concurrency  # noqa: I001  (after sys.path is set)
    from server.cli import parse_settings

    server_args = ["--device", args.device, "--dtype", args.dtype, *shlex.split(args.server_args)]
    settings = parse_settings(["--model", checkpoint, "--served-model-name", MODEL_NAME, *server_args], {})
    concurrency = args.batch_concurrency or default_concurrency(settings)
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", checkpoint, "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *server_args]  # fmt: skip
    peer = Peer("ours", argv, port, RequestOptions(MODEL_NAME, args.max_tokens))
    runs: list[Run] = []
    run_index = 0

    def next_bodies(count: int) -> list[bytes]:
        nonlocal run_index
        run_index += 1
        return build_bodies(args, run_index, count)

    with running(peer, work, startup_timeout_s=900) as base_url:
        url = base_url + "/chat/completions"
        async with InProcessApp(settings) as app:
            print(f"[batch] engine loaded in this process; {concurrency} rows in flight", flush=True)
            # Warm both sides the same way (the engines warmed themselves up at start).
            await batch_run(app, next_bodies(args.warmup), work, "warmup", concurrency, -1)
            await http_run(
                url, next_bodies(args.warmup), max(args.http_concurrency), -1, args.request_timeout
            )
            for repeat in range(args.repeats):
                sides: list[str | int] = ["batch", *args.http_concurrency]
                if repeat % 2:
                    sides.reverse()
                for side in sides:
                    bodies = next_bodies(args.requests)
                    if side == "batch":
                        run = await batch_run(app, bodies, work, f"run{run_index}", concurrency, repeat)
                    else:
                        run = await http_run(url, bodies, int(side), repeat, args.request_timeout)
                    runs.append(run)
                    print(
                        f"[repeat {repeat + 1}/{args.repeats}] {run.side:>12}: {run.seconds:7.2f} s, "
                        f"{run.rps:6.2f} req/s, {run.tps:8.1f} out tok/s, {run.ok} ok / {run.failed} failed",
                        flush=True,
                    )
    return runs


def report(runs: Sequence[Run], args: argparse.Namespace, load_s: float) -> str:
    sides = list(dict.fromkeys(r.side for r in runs))
    lines = [
        "| side | req/s mean | min | max | out tok/s mean | s per run mean | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    means: dict[str, float] = {}
    for side in sides:
        mine = [r for r in runs if r.side == side]
        rps = [r.rps for r in mine]
        means[side] = statistics.mean(rps)
        lines.append(
            f"| {side} | {means[side]:.2f} | {min(rps):.2f} | {max(rps):.2f} | "
            f"{statistics.mean(r.tps for r in mine):.1f} | {statistics.mean(r.seconds for r in mine):.2f} | "
            f"{sum(r.failed for r in mine)} |"
        )
    http = {s: m for s, m in means.items() if s != "batch"}
    best = max(http, key=http.__getitem__)
    batch_runs = [r.rps for r in runs if r.side == "batch"]
    best_runs = [r.rps for r in runs if r.side == best]
    ratio = means["batch"] / http[best]
    worst_ratio = min(batch_runs) / max(best_runs)
    verdict = "MET" if ratio >= 1 else "NOT MET"
    lines += [
        "",
        f"best HTTP concurrency: {best.split('=')[1]} ({http[best]:.2f} req/s); "
        f"batch / best HTTP = {ratio:.2f}x (slowest batch run / fastest HTTP run: {worst_ratio:.2f}x); "
        f"goal >= 1x: {verdict}",
        f"internvl-batch start-up and model load (one-row job, whole process): {load_s:.1f} s, not in the "
        "figures above (the server's start is not in its figures either)",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", default="small", help="random model size (model_runtime.loading.tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=256, help="requests per run (default: 256)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--detail", choices=("low", "auto", "high"), default="low", help="low = one tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=8, help="requests each side gets before timing")
    parser.add_argument(
        "--http-concurrency", type=int, nargs="+", default=[16, 64, 128], help="client concurrencies to try"
    )
    parser.add_argument("--batch-concurrency", type=int, help="default: internvl-batch's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--server-args", default="", help="more settings for both sides, e.g. '--max-num-seqs 32'"
    )
    parser.add_argument("--request-timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from model_runtime.loading.tiny import write_tiny_checkpoint  # noqa: I001  (imports torch)

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        checkpoint = str(
            write_tiny_checkpoint(work / f"{args.size}-seed{args.seed}", size=args.size, seed=args.seed)
        )
        server_args = ["--device", args.device, "--dtype", args.dtype, *shlex.split(args.server_args)]
        settings = (
            f"# batch vs HTTP: {args.requests} requests per run, "
            f"one {args.image_size[0]}x{args.image_size[1]} JPEG each (detail={args.detail}), "
            f"{args.max_tokens} output tokens (ignore_eos), greedy; random "
            f"'{args.size}' model, {args.device}/{args.dtype}; settings of both sides: "
            f"{shlex.join(shlex.split(args.server_args)) or 'the defaults'}; {args.repeats} repeats"
        )
        print(settings, flush=True)
        load_s = cli_load_time(checkpoint, server_args, work, build_bodies(args, 0, 1)[0])
        runs = asyncio.run(measure(args, checkpoint, work))
    text = settings + "\n\n" + report(runs, args, load_s)
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
