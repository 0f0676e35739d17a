"""`internvl-serve`: read Settings, start the engine, serve with uvicorn, drain on SIGTERM.

Exit codes: 0 after a signal-initiated drain; 1 if the engine died (after /health has reported
503 for a moment, so orchestrators see why) or failed to load; 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import types
import typing
from collections.abc import Awaitable, Callable, Collection, Generator, Mapping, Sequence
from importlib.metadata import version as package_version
from types import FrameType

import uvicorn

from model_runtime.engine_client import EngineClient
from server.app import create_app
from server.connections import connection_cap, guarded_protocol, raise_descriptor_limit
from server.drain import CUT_GRACE_S, drain
from server.log import configure_logging
from server.settings import Settings, SettingsError, field_kind, option_order

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEAD_POLL_S = 1.0
DEAD_EXIT_GRACE_S = 2.0  # time /health spends reporting 503 before the process exits
FLAG_NAMES: dict[str, list[str]] = {"api_keys": ["--api-key", "--api-keys"]}
# --help groups: (first setting of the group, title); a setting belongs to the last group started at
# or before it in option_order(). A name that is no longer a setting simply starts no group.
HELP_GROUPS: list[tuple[str, str]] = [
    ("model", "serving"),
    ("api_keys", "security"),
    ("allowed_local_media_path", "media fetching and request limits"),
    ("max_n", "generation limits"),
    ("responses_store_max", "Responses API store"),
    ("revision", "model loading"),
    ("max_model_len", "engine: batching, KV cache and memory"),
    ("max_tiles_per_image", "images and videos"),
]
METAVARS: dict[str, str] = {
    "model": "DIR|HUB_ID|demo",
    "served_model_name": "NAME",
    "host": "ADDRESS",
    "api_keys": "KEY",
    "cors_allow_origins": "ORIGIN",
    "allowed_local_media_path": "DIR",
    "allowed_media_domains": "HOST",
    "revision": "REF",
    "dtype": "{auto,bfloat16,float16,float32}",
    "device": "{auto,cuda,cuda:N,cpu}",
    "device_map": "MAP",
    "attn_implementation": "{auto,sdpa,eager,flash_attention_2}",
    "template": "NAME",
    "port": "PORT",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field; flags left out do not override the environment or the file."""
    parser = argparse.ArgumentParser(
        prog="internvl-serve",
        description="OpenAI-compatible server for InternVL models. Every flag is also an INTERNVL_* "
        "environment variable and a key of the --config YAML file (CLI > env > file > defaults).",
    )
    add_version_argument(parser)
    add_settings_arguments(parser)
    return parser


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    version = f"%(prog)s {package_version('internvl-serve')}"
    parser.add_argument("--version", action="version", version=version)


def add_settings_arguments(parser: argparse.ArgumentParser, skip: Collection[str] = ()) -> None:
    """--config and one flag per Settings field but those in `skip`, in titled groups, each with its
    type or choices (internvl-batch takes the same flags, less the HTTP server's own)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    title = HELP_GROUPS[0][1]
    starts = dict(HELP_GROUPS)
    groups[title] = parser.add_argument_group(title)
    groups[title].add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML file of settings (env: INTERNVL_CONFIG)",
    )
    for name in option_order():
        title = starts.get(name, title)
        if name in skip:
            continue
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add_setting(groups[title], name)


def _add_setting(group: argparse._ArgumentGroup, name: str) -> None:
    info = Settings.model_fields[name]
    flags = FLAG_NAMES.get(name, ["--" + name.replace("_", "-")])
    default = "(hidden)" if name == "api_keys" else info.get_default(call_default_factory=True)
    help_text = f"{info.description or name.replace('_', ' ')} (default: {default})"
    kind = field_kind(name)
    if kind == "bool":
        group.add_argument(
            *flags,
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    choices = setting_choices(name)
    metavar = "{" + ",".join(choices) + "}" if choices else setting_metavar(name)
    if kind == "list":
        group.add_argument(
            *flags,
            dest=name,
            nargs="+",
            action="extend",
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=help_text + "; several values, or comma-separated",
        )
        return
    group.add_argument(
        *flags, dest=name, default=argparse.SUPPRESS, choices=choices, metavar=metavar, help=help_text
    )


def setting_choices(name: str) -> list[str] | None:
    """The values a Literal setting takes ('none' too when it may be None); None for free values."""
    values: list[str] = []
    optional = False
    for arg in _union_members(name):
        if arg is type(None):
            optional = True
        elif typing.get_origin(arg) is typing.Literal:
            values += [str(v) for v in typing.get_args(arg)]
    if not values:
        return None
    return values + ["none"] if optional else values


def setting_metavar(name: str) -> str:
    """What --help shows for a free value: its unit when the name says it, else its type."""
    if name in METAVARS:
        return METAVARS[name]
    for suffix, metavar in (("_s", "SECONDS"), ("_bytes", "BYTES"), ("_gib", "GIB"), ("_mib", "MIB")):
        if name.endswith(suffix):
            return metavar
    for arg in _union_members(name):
        if typing.get_origin(arg) is list:
            arg = typing.get_args(arg)[0]
        if arg is int:
            return "INT"
        if arg is float:
            return "NUMBER"
    return "TEXT"


def _union_members(name: str) -> tuple[object, ...]:
    """`X | None` and `Optional[Literal[...]]` alike -> their members; anything else -> itself."""
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    try:
        return Settings.load(values, environ)
    except SettingsError as exc:
        parser.error(str(exc))  # exits 2


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv, os.environ)
    configure_logging(settings.log_level)
    code = asyncio.run(run(settings))
    # Exit now: the engine is stopped and every response written. Interpreter teardown (torch's
    # included) takes a while, during which the port would refuse connections instead of 503s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def run(settings: Settings) -> int:
    """Load the model (in a thread: it blocks for a long while), then serve until told to stop."""
    from model_runtime.errors import CheckpointError  # noqa: I001  (lazy: the runtime imports torch)
    from model_runtime.engine.worker import Worker

    if not settings.model:
        logger.error("no model given: use --model <dir | hub id | demo> or INTERNVL_MODEL")
        return 2
    model_path = settings.model
    if model_path == DEMO_MODEL:
        from model_runtime.loading.tiny import ensure_demo_checkpoint

        model_path = await asyncio.to_thread(ensure_demo_checkpoint)
        logger.info(
            "serving the demo model (tiny, random weights: its answers are noise) from %s", model_path
        )
    try:
        worker = await asyncio.to_thread(Worker.start, settings.to_engine_config(model_path))
    except CheckpointError as exc:
        logger.error("cannot load the model: %s", exc)
        return 1
    try:
        default_name = DEMO_MODEL if settings.model == DEMO_MODEL else worker.served_model_default_name
        return await serve(settings, worker, default_model_name=default_name, on_drained=worker.shutdown)
    finally:
        await worker.shutdown()


async def serve(
    settings: Settings,
    engine: EngineClient,
    *,
    default_model_name: str | None = None,
    on_drained: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve `engine` until a signal (exit 0 after draining) or its death (exit 1). `on_drained`
    runs after the drain, while the port still answers 503s (stopping the engine there keeps the
    time the port refuses connections short)."""
    app = create_app(settings, engine, default_model_name=default_model_name)
    descriptors = raise_descriptor_limit()
    max_connections = connection_cap(settings.max_connections, descriptors)
    if max_connections < settings.max_connections:
        logger.warning(
            "max_connections lowered to %d: the process may open %d files", max_connections, descriptors
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        lifespan="on",
        http=guarded_protocol(header_timeout_s=settings.header_timeout_s, max_connections=max_connections),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        # After the drain (server/drain.py) only idle or already-cut connections remain.
        timeout_graceful_shutdown=int(CUT_GRACE_S) + 1,
    )
    state = app.state.server

    async def drain_then_stop() -> None:
        await drain(state, settings.drain_timeout_s)
        if on_drained is not None:
            await on_drained()

    server = DrainingServer(config, drain=drain_then_stop)
    died = False

    def on_dead() -> None:
        nonlocal died
        died = True
        server.should_exit = True

    watchdog = asyncio.create_task(watch_engine(engine, on_dead))
    try:
        await server.serve()
    finally:
        watchdog.cancel()
    return 1 if died else 0


async def watch_engine(
    engine: EngineClient,
    on_dead: Callable[[], None],
    *,
    poll_s: float = DEAD_POLL_S,
    grace_s: float = DEAD_EXIT_GRACE_S,
) -> None:
    """Call `on_dead` once the engine is dead; /health has been answering 503 during `grace_s`."""
    while engine.health != "dead":
        await asyncio.sleep(poll_s)
    logger.critical(
        "the engine is dead; exiting in %.1f s so that the orchestrator restarts the server", grace_s
    )
    await asyncio.sleep(grace_s)
    on_dead()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on SIGTERM/SIGINT before it stops listening, and exits 0 after.

    uvicorn stops accepting connections at the first signal; we keep serving (503s to new
    requests, server/drain.py) until the drain is over, then let uvicorn shut down. A second
    signal skips the rest of the drain; a third is uvicorn's forced exit. uvicorn also re-raises a
    captured signal once it has shut down, which would end the process "killed by SIGTERM"; a
    drained server reports success instead.
    """

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining:
            self._draining = True
            # A signal handler runs between any two bytecodes of the loop: start the drain from
            # the loop itself.
            asyncio.get_running_loop().call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._drain_task is None:  # not a drain (the engine died): uvicorn's own shutdown
            await super().shutdown(sockets)
            return
        # Drained: every request has finished or been cut. Run the app's shutdown while the port
        # still answers 503s, then stop listening with nothing left to wait for, so that the port
        # refuses connections only for the moment before the process exits.
        logger.info("drained; shutting down")
        await self.lifespan.shutdown()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CUT_GRACE_S
        while self.server_state.tasks and loop.time() < deadline:  # 503s being written
            await asyncio.sleep(0.01)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    main()
