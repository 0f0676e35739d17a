"""The real `internvl-serve` as a subprocess on a free loopback port: a test helper, not a test.

`ServerProcess` starts the CLI (or a test launcher wrapping it) with a model directory, extra
flags and a fresh HF_HOME, waits for `/health`, and afterwards signals it, reads its logs and
checks that it exited. `ServerPool` starts several at once (startup is mostly CPU-bound imports,
so overlapping it with other work saves wall time) and restarts one that a test ended.
`session_servers` shares one checkpoint and the standard servers between test modules, so a
session pays for each start once.
"""

from __future__ import annotations

import atexit
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_MODULE = "server.cli"
FAULT_LAUNCHER_MODULE = "tests.fault_launcher"
HOST = "127.0.0.1"
# Small enough that several servers fit beside each other on a CI runner: a 4096-token context
# and 128 MiB of KV cache (64 slots for the tiny model).
LEAN_FLAGS = ("--max-model-len", "4096", "--kv-cache-memory-gib", "0.125")
START_TIMEOUT_S = 180.0  # imports and model load are CPU-bound; CI runners are shared
_PORT_RETRIES = 3


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (another process may still take it: see `start`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name' or 'name{label="value",...}': value}; the model_name label is
    dropped (one model per server)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


SERVED_MODEL_NAME = "tiny-internvl"


@dataclass
class ServerProcess:
    """One `internvl-serve` process; `start()` returns at once, `wait_healthy()` blocks."""

    model: str | os.PathLike[str]
    workdir: Path
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    module: str = CLI_MODULE
    threads: int = 1  # torch threads: several servers share a small CI machine
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server was never started"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            self.module,
            "--model",
            str(self.model),
            "--host",
            HOST,
            "--port",
            str(self.port),
            *self.args,
            # requests must name their model; every test server answers to the same name
            *([] if "--served-model-name" in self.args else ["--served-model-name", SERVED_MODEL_NAME]),
        ]

    def start(self) -> ServerProcess:
        """Launch the process (non-blocking)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        hf_home = self.workdir / "hf-home"
        hf_home.mkdir(exist_ok=True)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("INTERNVL_")
            and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        env.update(
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=str(self.threads),
            MKL_NUM_THREADS=str(self.threads),
        )
        env.update(self.env)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        """Block until GET /health is 200; restart on a port someone else took in the meantime."""
        for attempt in range(_PORT_RETRIES):
            if self._poll_health(timeout):
                return self
            if attempt + 1 < _PORT_RETRIES and "address already in use" in self.logs().lower():
                self.start()
                continue
            break
        code = self.proc.poll() if self.proc else None
        self.stop()
        raise AssertionError(
            f"internvl-serve did not become healthy (exit code {code}); its log:\n{self.logs()[-6000:]}"
        )

    def _poll_health(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails the test (with the log) if the process is still running after `timeout`."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"internvl-serve (pid {self.pid}) still running after {timeout} s; "
                f"log:\n{self.logs()[-4000:]}"
            ) from None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- what the process holds, from /proc ----------------------------------------------------

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    # -- HTTP conveniences ---------------------------------------------------------------------

    def metrics_text(self) -> str:
        r = httpx.get(f"{self.base_url}/metrics", timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        return r.text

    def metrics(self) -> dict[str, float]:
        return metric_values(self.metrics_text())

    def health(self) -> int:
        return httpx.get(f"{self.base_url}/health", timeout=10, trust_env=False).status_code


class ServerPool:
    """Named servers started together; `get` waits for one, restarting it if a test ended it.

    The first `launch` of a name defines it; later ones are no-ops, so that several test modules
    can ask for the same standard server and share it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._specs: dict[str, Callable[[Path], ServerProcess]] = {}
        self._servers: dict[str, ServerProcess] = {}
        self._generation: dict[str, int] = {}
        atexit.register(self.kill)  # a session ended by ^C or a crash leaves no server behind

    def launch(self, name: str, make: Callable[[Path], ServerProcess]) -> None:
        """Start `name` now, without waiting (nothing happens if it was launched before)."""
        if name not in self._specs:
            self._specs[name] = make
            self._start(name)

    def _start(self, name: str) -> ServerProcess:
        self._generation[name] = self._generation.get(name, 0) + 1
        server = self._specs[name](self.root / f"{name}-{self._generation[name]}").start()
        self._servers[name] = server
        return server

    def get(self, name: str) -> ServerProcess:
        server = self._servers[name]
        if server.proc is not None and server.proc.poll() is not None:
            server = self._start(name)
        return server.wait_healthy()

    def close(self) -> None:
        """Signal every server first, then wait for each: their shutdowns overlap."""
        for server in self._servers.values():
            if server.running:
                server.send_signal(signal.SIGTERM)
        for server in self._servers.values():
            server.stop()

    def kill(self) -> None:
        for server in self._servers.values():
            if server.running:
                server.send_signal(signal.SIGKILL)


# -- the servers the e2e and reliability modules share ---------------------------------------------

MAIN = "main"  # default settings (private networks refused, no key), as a user starts it
KEYED = "keyed"  # the fault launcher (its hook fires only on marker prompts), with an API key
API_KEY = "k1"
DRAIN_TIMEOUT_S = 10.0


@dataclass
class SharedServers:
    """One tiny checkpoint and one ServerPool per pytest session, whichever module asks first."""

    checkpoint: Path
    pool: ServerPool

    def launch_standard(self) -> None:
        checkpoint = self.checkpoint
        main_flags = [
            *LEAN_FLAGS,
            "--served-model-name",
            SERVED_MODEL_NAME,
            "--drain-timeout-s",
            str(DRAIN_TIMEOUT_S),
        ]
        self.pool.launch(MAIN, lambda d: ServerProcess(checkpoint, d, args=main_flags))
        self.pool.launch(
            KEYED,
            lambda d: ServerProcess(
                checkpoint, d, args=[*LEAN_FLAGS, "--api-key", API_KEY], module=FAULT_LAUNCHER_MODULE
            ),
        )


_session: dict[str, SharedServers] = {}


def session_servers(request: pytest.FixtureRequest) -> SharedServers:
    """The session's shared checkpoint and servers (the standard ones already launched)."""
    servers = _session.get("servers")
    if servers is None:
        from model_runtime.loading.tiny import write_tiny_checkpoint

        tmp = request.getfixturevalue("tmp_path_factory")
        checkpoint = write_tiny_checkpoint(tmp.mktemp("tiny-checkpoint") / "tiny", seed=0)
        servers = _session["servers"] = SharedServers(checkpoint, ServerPool(tmp.mktemp("servers")))
        request.session.addfinalizer(servers.pool.close)
        request.session.addfinalizer(lambda: _session.pop("servers", None))
    servers.launch_standard()
    return servers


# -- media the clients send ------------------------------------------------------------------------


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_bytes(
    width: int, height: int, *, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **save: Any
) -> bytes:
    """A noise image (incompressible, so truncating it cuts pixel data) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def mp4_bytes(
    frames: int = 8, width: int = 64, height: int = 48, *, fps: int = 8, codec: str = "mpeg4"
) -> bytes:
    """An MP4 whose frames differ (a moving gradient); `frames=0` writes a header and no frame."""
    import av  # a test extra; only the media tests need it

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if frames == 0:
            container.start_encoding()
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        for i in range(frames):
            pixels = ((ramp + 17 * i) % 256).astype(np.uint8).repeat(height, 0).repeat(3, 2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        if frames:
            for packet in stream.encode():
                container.mux(packet)
    return buf.getvalue()
