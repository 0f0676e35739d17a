"""Serving benchmark: streaming chat load on OpenAI-compatible servers, in the style of `vllm bench serve`.

Drive a server that is already running (loopback only):

    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --workloads image --concurrency 1 16

Or start, measure and stop the three peers one after another on the same random model (`--compare`):
ours (`internvl-serve`, original layout), `transformers serve` (-hf layout, from its own virtualenv
given by --transformers-serve-python, since it needs torchvision) and benchmarks/baseline_server.py
(the model cards' `model.chat()` one request at a time):

    python benchmarks/serve.py --compare --transformers-serve-python /work/venvs/tserve/bin/python

Every run sends --num-prompts greedy streaming requests at one concurrency level or Poisson rate
and is bounded by --run-timeout; every request by --request-timeout. Results are a Markdown table
(see benchmarks/README.md for the columns); --output and --json also write them to files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

# benchmarks/ is a directory of scripts, not a package: `python benchmarks/serve.py` puts it on sys.path.
from _loadgen import (
    WORKLOADS,
    Load,
    RequestOptions,
    Summary,
    build_messages,
    encode_body,
    markdown_table,
    run_load,
    stream_chat,
    summarize,
)
from _peers import PEERS, PeerSettings, PeerUnavailable, make_peer, running, write_checkpoints

GOAL_WORKLOAD, GOAL_CONCURRENCY, GOAL_THROUGHPUT_RATIO = "image", 16, 5.0


def check_loopback(base_url: str) -> None:
    """Refuse any target but this machine: the benchmark sends load only to loopback addresses."""
    host = urlsplit(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"error: --base-url must point at this machine (127.0.0.1, localhost or ::1), not {host!r}")


# --- measuring one server -------------------------------------------------------------------------


async def discover_model(base_url: str) -> str | None:
    """The first id of GET /v1/models, or None (the request then names no model)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            response = await client.get(base_url + "/models")
            if response.status_code == 200:
                return str(response.json()["data"][0]["id"])
    return None


async def probe_options(
    url: str, options: RequestOptions, timeout_s: float
) -> tuple[RequestOptions, list[str]]:
    """Drop the optional fields (`stream_options`, `ignore_eos`) a server rejects; return what it said."""
    said = []
    messages = build_messages("text", 0, seed=12345)
    candidates = [
        options,
        replace(options, ignore_eos=False),
        replace(options, include_usage=False),
        replace(options, include_usage=False, ignore_eos=False),
    ]
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        for candidate in candidates:
            probe = replace(candidate, max_tokens=2)
            result = await stream_chat(client, url, encode_body(messages, probe))
            if result.ok:
                return candidate, said
            said.append(f"{_fields(candidate)} -> {result.error}")
    return options, said


def _fields(options: RequestOptions) -> str:
    named = [
        name
        for name, on in (("stream_options", options.include_usage), ("ignore_eos", options.ignore_eos))
        if on
    ]
    return "with " + " + ".join(named) if named else "with neither stream_options nor ignore_eos"


async def bench_server(
    name: str,
    base_url: str,
    options: RequestOptions,
    args: argparse.Namespace,
    loads: Sequence[Load],
    payloads: dict[str, Payloads],
) -> list[Summary]:
    """Every workload at every load against one server; prints each row as it is measured."""
    url = base_url + "/chat/completions"
    if options.model is None:
        options = replace(options, model=args.model_name or await discover_model(base_url))
    options, rejections = await probe_options(url, options, args.request_timeout)
    for line in rejections:
        print(f"[{name}] probe {line}", flush=True)
    print(
        f"[{name}] requests: model={options.model!r}, stream_options={options.include_usage}, "
        f"ignore_eos={options.ignore_eos}",
        flush=True,
    )
    rows = []
    for workload in args.workloads:
        warm = [encode_body(m, options) for m in payloads[workload].warmup]
        if warm:
            warm_results, _ = await run_load(
                url,
                warm,
                Load(concurrency=1),
                run_timeout_s=args.run_timeout,
                request_timeout_s=args.request_timeout,
            )
            failed = [r.error for r in warm_results if not r.ok]
            if failed:
                print(f"[{name}] {workload} warm-up failed: {failed[0]}", flush=True)
        for load, messages in zip(loads, payloads[workload].runs, strict=True):
            results, wall = await run_load(
                url,
                [encode_body(m, options) for m in messages],
                load,
                run_timeout_s=args.run_timeout,
                request_timeout_s=args.request_timeout,
                seed=args.seed,
            )
            row = summarize(name, workload, load, results, wall)
            print(markdown_table([row]).splitlines()[2], flush=True)
            rows.append(row)
    return rows


@dataclass
class Payloads:
    """One workload's messages: the warm-up requests and, per load, the requests of that run."""

    warmup: list[list[dict[str, Any]]]
    runs: list[list[list[dict[str, Any]]]]


def run_indices(run: int, num_prompts: int) -> range:
    """Request indices of the run-th load: every run gets media of its own, so that no server's image
    cache can answer a later run from an earlier one's images (ours keeps vision features)."""
    return range(run * num_prompts, (run + 1) * num_prompts)


def make_payloads(args: argparse.Namespace, runs: int) -> dict[str, Payloads]:
    """Messages of every request, built once, seeded: every server gets the same ones."""
    started = time.perf_counter()
    warm = range(runs * args.num_prompts, runs * args.num_prompts + args.warmup)  # past every run's
    payloads = {
        w: Payloads(
            warmup=[build_messages(w, i, args.seed) for i in warm],
            runs=[
                [build_messages(w, i, args.seed) for i in run_indices(k, args.num_prompts)]
                for k in range(runs)
            ],
        )
        for w in args.workloads
    }
    count = runs * args.num_prompts + args.warmup
    print(f"built {count} requests per workload in {time.perf_counter() - started:.1f} s", flush=True)
    return payloads


# --- the report -----------------------------------------------------------------------------------


def is_goal(load: Load) -> bool:
    """The load of the issue's goal: GOAL_CONCURRENCY requests in flight, no arrival rate."""
    return load.concurrency == GOAL_CONCURRENCY and load.rate is None


def goal_lines(rows: Sequence[Summary], floor: dict[str, Any] | None = None) -> list[str]:
    """Ours against `transformers serve` on every shared image-workload load; the issue's goal at c=16;
    and, given benchmarks/floor.py's figures for the same requests, how far any server could go."""
    lines = []
    by_key = {(r.server, r.workload, r.load): r for r in rows}
    for (server, workload, load), ours in by_key.items():
        peer = by_key.get(("transformers", workload, load))
        if server != "ours" or workload != GOAL_WORKLOAD or peer is None:
            continue
        goal = is_goal(load)
        tag = " (the issue's goal)" if goal else ""
        if peer.request_throughput > 0:
            ratio = ours.request_throughput / peer.request_throughput
            verdict = (
                f"goal ≥ {GOAL_THROUGHPUT_RATIO:g}×: {'MET' if ratio >= GOAL_THROUGHPUT_RATIO else 'NOT MET'}"
            )
            lines.append(
                f"- {workload}, {load.label}{tag}: request throughput ours / transformers serve = "
                f"{ratio:.2f}× ({verdict if goal else 'for reference'})"
            )
        else:
            lines.append(f"- {workload}, {load.label}{tag}: transformers serve completed no request")
        if peer.ttft.p99 == peer.ttft.p99 and ours.ttft.p99 == ours.ttft.p99:  # neither is NaN
            ratio = ours.ttft.p99 / peer.ttft.p99
            verdict = f"goal < 1: {'MET' if ratio < 1 else 'NOT MET'}" if goal else "for reference"
            lines.append(
                f"- {workload}, {load.label}{tag}: p99 TTFT ours / transformers serve = "
                f"{ratio:.3f} ({ours.ttft.p99 * 1000:.0f} ms vs {peer.ttft.p99 * 1000:.0f} ms; {verdict})"
            )
        if goal and floor and peer.request_throughput > 0:
            best = floor["req_per_s"]
            lines.append(
                f"- {workload}: roofline floor of these requests on this machine (benchmarks/floor.py): "
                f"at most {best:.3f} req/s, so no server can exceed {best / peer.request_throughput:.2f}× "
                f"transformers serve here; ours reached {ours.request_throughput / best:.0%} of the floor"
            )
    return lines


def run_floor(args: argparse.Namespace, model: str, work: Path, first: int) -> dict[str, Any] | None:
    """benchmarks/floor.py on the goal workload's requests (from index `first`), in a child process
    (it loads the model)."""
    out = work / "floor.json"
    command = [sys.executable, str(Path(__file__).with_name("floor.py")), "--model", model]
    command += ["--workload", GOAL_WORKLOAD, "--requests", str(args.num_prompts), "--first-index", str(first)]
    command += ["--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
    command += ["--device", args.device, "--dtype", args.dtype, "--json", str(out)]
    print("[floor] " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0 or not out.exists():
        print(f"[floor] FAILED (exit {result.returncode})", flush=True)
        return None
    return json.loads(out.read_text())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    target = p.add_argument_group("target")
    target.add_argument(
        "--base-url", help="OpenAI base URL of a running server, e.g. http://127.0.0.1:8000/v1"
    )
    target.add_argument("--model-name", help="'model' to send (default: the first of /v1/models)")
    target.add_argument("--compare", action="store_true", help="start, measure and stop the peers in turn")
    target.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="peers of --compare")
    target.add_argument(
        "--transformers-serve-python", help="python of a venv with transformers serve + torchvision"
    )
    target.add_argument("--size", default="small", choices=["tiny", "small", "1b"], help="random model size")
    target.add_argument("--llm", default="qwen2", choices=["qwen2", "internlm2"], help="random model's LLM")
    target.add_argument(
        "--model-original", help="use this original-layout checkpoint instead of a random one"
    )
    target.add_argument("--model-hf", help="the same weights in the -hf layout (for transformers serve)")
    target.add_argument("--device", default="cpu", help="device of every peer")
    target.add_argument("--dtype", default="float32", help="dtype of every peer")
    target.add_argument(
        "--ours-args", default="", help="extra internvl-serve flags, one string: --ours-args='--flag value'"
    )
    target.add_argument(
        "--transformers-serve-args",
        default="",
        help="extra transformers serve flags, one string (as --ours-args)",
    )
    target.add_argument("--no-floor", action="store_true", help="skip benchmarks/floor.py after --compare")
    target.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds a peer may take to start"
    )
    load = p.add_argument_group("load")
    load.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    load.add_argument("--concurrency", nargs="*", type=int, default=[1, 16], help="levels, one run each")
    load.add_argument(
        "--request-rate", nargs="*", type=float, default=[], help="Poisson rates (req/s), one run each"
    )
    load.add_argument("--max-concurrency", type=int, help="cap on requests in flight in rate runs")
    load.add_argument("--num-prompts", type=int, default=32, help="requests per run")
    load.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    load.add_argument("--warmup", type=int, default=1, help="unmeasured requests per server and workload")
    load.add_argument("--seed", type=int, default=0, help="seed of the media, arrivals and random model")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds, per request")
    load.add_argument("--run-timeout", type=float, default=1800.0, help="seconds, per run")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="also write the Markdown report here")
    out.add_argument("--json", help="also write every row as JSON here")
    out.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs (default: temp dir removed)"
    )
    args = p.parse_args(argv)
    if bool(args.base_url) == args.compare:
        p.error("give exactly one of --base-url (a running server) or --compare (start the peers)")
    if not args.concurrency and not args.request_rate:
        p.error("give at least one --concurrency level or --request-rate")
    if min([*args.concurrency, args.num_prompts, args.max_tokens, 1]) < 1 or args.warmup < 0:
        p.error("--concurrency, --num-prompts and --max-tokens must be positive, --warmup not negative")
    if bool(args.model_original) != bool(args.model_hf):
        p.error("give both --model-original and --model-hf, or neither")
    return args


async def run(args: argparse.Namespace) -> tuple[list[Summary], dict[str, Any] | None]:
    loads = [Load(concurrency=c) for c in args.concurrency]
    loads += [Load(concurrency=args.max_concurrency, rate=r) for r in args.request_rate]
    if args.base_url:
        check_loopback(args.base_url)
    payloads = make_payloads(args, len(loads))
    if args.base_url:
        options = RequestOptions(args.model_name, args.max_tokens)
        name = urlsplit(args.base_url).netloc
        return await bench_server(name, args.base_url.rstrip("/"), options, args, loads, payloads), None
    work = Path(tempfile.mkdtemp(prefix="internvl-bench-"))
    try:
        return await compare(args, loads, payloads, work)
    finally:
        if args.keep_logs:
            print(f"logs and checkpoints kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


async def compare(
    args: argparse.Namespace,
    loads: Sequence[Load],
    payloads: dict[str, Payloads],
    work: Path,
) -> tuple[list[Summary], dict[str, Any] | None]:
    """Start each peer in turn (never two at once: they would share the CPU), measure it, stop it;
    then the roofline floor of the goal workload (unless --no-floor)."""
    if args.model_original:
        original, hf = args.model_original, args.model_hf
    else:
        original, hf = write_checkpoints(args.size, args.llm, args.seed, work)
        print(f"random InternVL '{args.size}' (seed {args.seed}): {original} and {hf}", flush=True)
    settings = PeerSettings(
        original_dir=original,
        hf_dir=hf,
        device=args.device,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        work_dir=work,
        transformers_python=args.transformers_serve_python,
        ours_args=args.ours_args,
        transformers_args=args.transformers_serve_args,
    )
    rows: list[Summary] = []
    for name in args.peers:
        try:
            peer = make_peer(name, settings)
        except PeerUnavailable as exc:
            print(f"[{name}] SKIPPED: {exc}", flush=True)
            continue
        try:
            with running(peer, work, args.startup_timeout) as base_url:
                rows += await bench_server(name, base_url, peer.options, args, loads, payloads)
        except RuntimeError as exc:
            print(f"[{name}] FAILED: {exc}", flush=True)
    goal = [k for k, load in enumerate(loads) if is_goal(load)]
    floor = None
    if not args.no_floor and GOAL_WORKLOAD in args.workloads:
        first = run_indices(goal[0] if goal else 0, args.num_prompts).start
        floor = run_floor(args, original, work, first)
    return rows, floor


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rows, floor = asyncio.run(run(args))
    report = markdown_table(rows)
    goals = goal_lines(rows, floor)
    if goals:
        report += "\n\nOurs vs `transformers serve`:\n" + "\n".join(goals)
    print("\n" + report)
    if args.output:
        Path(args.output).write_text(report + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_json() for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
