"""`internvl-batch`: OpenAI Batch JSONL through the server's app and engine, in this process or on
Ray Data replicas; resumable (a rerun skips what the output file already answers).

Exit codes: 0 every row of the output file succeeded; 1 every row was answered and some failed (an
error line, or an HTTP status of 400 or more); 2 usage errors (flags, settings, an unreadable input,
an output file that is not a batch output); 3 the job did not finish (the model did not load, the
engine or a Ray replica died): a rerun resumes it; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from batch.jsonl import (
    ENVELOPE_BYTES,
    Done,
    LineError,
    OutputFileError,
    OutputWriter,
    Row,
    count_lines,
    read_done,
    read_rows,
)
from batch.progress import Progress
from batch.runner import EngineDiedError, InProcessApp, default_concurrency, run_rows
from server.cli import add_settings_arguments, add_version_argument
from server.log import configure_logging
from server.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_UNFINISHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

JOB_OPTIONS = (
    "input",
    "output",
    "concurrency",
    "progress_interval_s",
    "ray",
    "replicas",
    "ray_address",
    "ray_batch_size",
    "ray_cpus_per_replica",
)


# The HTTP server's own settings: nothing listens in a batch job.
SERVER_ONLY = (
    "host",
    "port",
    "drain_timeout_s",
    "header_timeout_s",
    "body_timeout_s",
    "keep_alive_timeout_s",
    "max_connections",
    "max_event_loop_lag_s",
    "stream_send_timeout_s",
    "api_keys",
    "metrics_require_auth",
    "metrics_names",
    "cors_allow_origins",
    "cache_isolation",
)


@dataclass(frozen=True)
class Job:
    """A batch job's own options (the server's settings are separate)."""

    input: Path
    output: Path
    concurrency: int
    progress_interval_s: float = 10.0
    ray: bool = False
    replicas: int = 1
    ray_address: str | None = None
    ray_batch_size: int | None = None
    ray_cpus_per_replica: int = 1
    max_line_bytes: int = 64 * 1024 * 1024 + ENVELOPE_BYTES  # longer input lines are refused unread


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internvl-batch",
        description="Run an OpenAI Batch input file (JSONL: custom_id, method, url, body) through the "
        "server's API in-process and write OpenAI Batch output lines as rows finish. Rerun the same "
        "command to resume: rows the output already answers are skipped. Every server flag applies "
        "(limits, media, engine), as do INTERNVL_* variables and --config; but --step-time-target-ms "
        "defaults to 2000: nothing streams, so engine steps are sized for throughput.",
        epilog="exit codes: 0 every row succeeded; 1 every row answered, some failed; 2 usage error; "
        "3 unfinished (model load, engine or replica failure): rerun to resume",
    )
    add_version_argument(parser)
    job = parser.add_argument_group("batch job")
    job.add_argument("--input", required=True, type=Path, metavar="IN.jsonl", help="OpenAI Batch input file")
    job.add_argument(
        "--output",
        required=True,
        type=Path,
        metavar="OUT.jsonl",
        help="OpenAI Batch output file; appended to, and read first to resume",
    )
    job.add_argument(
        "--concurrency",
        type=int,
        metavar="INT",
        help="rows in flight per engine (default: 1.5 x --max-num-seqs, at most --max-waiting)",
    )
    job.add_argument(
        "--progress-interval-s",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: 10)",
    )
    ray = parser.add_argument_group("Ray Data (pip install 'internvl-serve[ray]')")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data replicas instead of in this process")
    ray.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="INT",
        help="engine replicas: one GPU each, or CPUs (default: 1)",
    )
    ray.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="an existing cluster (e.g. auto, or ray://head:10001); default: RAY_ADDRESS, else a local one",
    )
    ray.add_argument(
        "--ray-batch-size",
        type=int,
        metavar="INT",
        help="rows per map_batches call (default: the rows spread over every replica, at most "
        "--concurrency); each replica runs two calls at once",
    )
    ray.add_argument(
        "--ray-cpus-per-replica",
        type=int,
        default=1,
        metavar="INT",
        help="CPUs (torch threads) of each replica where the cluster has no GPU (default: 1)",
    )
    add_settings_arguments(parser, skip=SERVER_ONLY)
    return parser


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[Job, Settings]:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        settings = Settings.load({k: v for k, v in args.items() if k not in JOB_OPTIONS}, environ)
    except SettingsError as exc:
        parser.error(str(exc))  # exits 2
    if not settings.model:
        parser.error("no model given: use --model <dir | hub id | demo> or INTERNVL_MODEL")
    if not args["input"].is_file():
        parser.error(f"--input {args['input']}: no such file")
    if args["output"].resolve() == args["input"].resolve():
        parser.error("--output must not be the input file")
    if not args["ray"] and args["replicas"] != 1:
        parser.error("--replicas needs --ray")
    for name in ("concurrency", "replicas", "ray_batch_size", "ray_cpus_per_replica"):
        if args[name] is not None and args[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    concurrency = args["concurrency"] or default_concurrency(settings)
    options = {k: args[k] for k in JOB_OPTIONS if k != "concurrency"}
    job = Job(**options, concurrency=concurrency, max_line_bytes=settings.max_body_bytes + ENVELOPE_BYTES)
    return job, settings


def main(argv: Sequence[str] | None = None) -> None:
    job, settings = parse(argv, os.environ)
    configure_logging(settings.log_level)
    try:
        done = read_done(job.output)
    except (OutputFileError, OSError) as exc:
        logger.error("cannot resume from %s: %s", job.output, exc)
        sys.exit(EXIT_USAGE)
    if done.truncated_bytes:
        logger.warning(
            "%s: removed a torn last line (%d bytes); its row runs again", job.output, done.truncated_bytes
        )
    if done.records:
        logger.info(
            "%s: resuming; %d rows already answered (%d failed)", job.output, done.records, done.failed
        )
    total = max(count_lines(job.input) - done.records, 0)
    try:
        if job.ray:
            from batch.ray_runner import run_on_ray

            code = run_on_ray(job, settings, done, total)
        else:
            code = asyncio.run(run_here(job, settings, done, total))
    except KeyboardInterrupt:
        logger.error("interrupted; rerun the same command to resume")
        code = EXIT_INTERRUPTED
    sys.exit(code)


async def run_here(job: Job, settings: Settings, done: Done, total: int) -> int:
    """The job in this process: one engine, `job.concurrency` rows in flight."""
    from model_runtime.errors import CheckpointError  # lazy: the runtime imports torch

    with OutputWriter(job.output) as writer:
        progress = Progress(total, interval_s=job.progress_interval_s)

        def write(record: dict) -> None:
            writer.write(record)
            progress.update(record)

        rows = read_rows(job.input, done, max_line_bytes=job.max_line_bytes)
        # The line-level errors before the first row are written at once; the model loads only if a
        # row is left to send.
        first = next((item for item in rows if not _written(item, write)), None)
        try:
            if first is not None:
                async with InProcessApp(settings) as app:
                    progress.restart()
                    await run_rows(app, itertools.chain([first], rows), write, concurrency=job.concurrency)
        except CheckpointError as exc:
            logger.error("cannot load the model: %s", exc)
            return EXIT_UNFINISHED
        except EngineDiedError:
            logger.error("the engine died; the rows it held were not written: rerun to resume")
            return EXIT_UNFINISHED
        except Exception:  # noqa: BLE001 - whatever stopped the job, what was written stays valid
            logger.exception("the job stopped; rerun the same command to resume")
            return EXIT_UNFINISHED
        finally:
            progress.close()
    return finish(job, done, progress)


def _written(item: Row | LineError, write: Callable[[dict], None]) -> bool:
    if isinstance(item, LineError):
        write(item.record())
        return True
    return False


def finish(job: Job, done: Done, progress: Progress) -> int:
    failed = done.failed + progress.failed
    answered = done.records + progress.rows
    if failed:
        logger.warning(
            "%s: %d of %d rows failed (error lines, or status >= 400)", job.output, failed, answered
        )
        return EXIT_ROWS_FAILED
    logger.info("%s: all %d rows succeeded", job.output, answered)
    return EXIT_OK


if __name__ == "__main__":
    main()
