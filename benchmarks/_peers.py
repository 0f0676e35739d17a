"""The servers benchmarks/serve.py --compare starts: command lines, checkpoints, start and stop.

Each peer runs as a child process in its own session, logs to a file, is ready when its health
path answers 200, and is stopped with SIGTERM, then SIGKILL to its process group after a grace
period. Only 127.0.0.1 is ever bound or contacted.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from _loadgen import RequestOptions

REPO = Path(__file__).resolve().parent.parent
PEERS = ("ours", "transformers", "baseline")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

# Run by the transformers-serve Python: the -hf files `transformers serve` needs beside the weights
# (AutoProcessor refuses to build without them), with the values transformers' InternVL conversion
# script writes for InternVL3-*-hf: GotOcr2 tiling with ImageNet statistics, the `<IMG_CONTEXT>` /
# `<video>` chat template, and the image-token names the processor reads from the tokenizer.
HF_PROCESSOR_SCRIPT = r"""
import sys
from transformers import AutoTokenizer, GotOcr2ImageProcessorFast, InternVLProcessor, InternVLVideoProcessor
src, dst = sys.argv[1], sys.argv[2]
mean, std, size = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], {"height": 448, "width": 448}
tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
          "video_token": "<video>"}
tokenizer = AutoTokenizer.from_pretrained(src, extra_special_tokens=tokens)
image = GotOcr2ImageProcessorFast(do_resize=True, size=size, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=True)
video = InternVLVideoProcessor(size=size, image_mean=mean, image_std=std)
template = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                  chat_template=template).save_pretrained(dst)
"""


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why."""


@dataclass(frozen=True)
class Peer:
    """A server to start: its command line, port, readiness path and request options."""

    name: str
    argv: list[str]
    port: int
    options: RequestOptions
    health_path: str = "/health"


@dataclass(frozen=True)
class PeerSettings:
    """What every peer is started with."""

    original_dir: str  # original layout: ours and the baseline
    hf_dir: str  # the same weights in the -hf layout: transformers serve
    device: str
    dtype: str
    max_tokens: int
    work_dir: Path  # logs and derived checkpoint directories
    transformers_python: str | None = None
    ours_args: str = ""
    transformers_args: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_checkpoints(size: str, llm: str, seed: int, work: Path) -> tuple[str, str]:
    """The same seeded random weights in the original layout and in the -hf layout."""
    from model_runtime.loading.tiny import write_tiny_checkpoint  # lazy: imports torch

    made = []
    for layout in ("original", "hf"):
        path = work / f"{size}-{llm}-seed{seed}-{layout}"
        write_tiny_checkpoint(path, layout=layout, llm=llm, size=size, seed=seed)
        made.append(str(path))
    return made[0], made[1]


def transformers_serve_dir(python: str, hf_dir: str, work: Path) -> str:
    """A directory `transformers serve` can load: the -hf weights, plus processor files if missing."""
    src = Path(hf_dir)
    if (src / "processor_config.json").exists() or (src / "preprocessor_config.json").exists():
        return hf_dir
    dst = work / (src.name + "-with-processor")
    dst.mkdir(exist_ok=True)
    for item in src.iterdir():
        if item.name.startswith(("config", "generation_config", "model")) and not (dst / item.name).exists():
            (dst / item.name).symlink_to(item.resolve())
    try:
        subprocess.run(
            [python, "-c", HF_PROCESSOR_SCRIPT, str(src), str(dst)],
            check=True,
            capture_output=True,
            timeout=300,
            env={**os.environ, **OFFLINE_ENV},
        )
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise PeerUnavailable(f"cannot write its processor files: {tail[0]}") from None
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise PeerUnavailable(f"cannot write its processor files: {exc}") from None
    return str(dst)


def make_peer(name: str, settings: PeerSettings) -> Peer:
    """The command line of peer `name`; PeerUnavailable when it cannot run here."""
    port = free_port()
    where = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        settings.device,
        "--dtype",
        settings.dtype,
    ]
    options = RequestOptions(None, settings.max_tokens)  # None: the first id of /v1/models
    if name == "ours":
        quiet = ["--log-level", "warning", "--drain-timeout-s", "5"]
        argv = [sys.executable, "-m", "server.cli", "--model", settings.original_dir, *where, *quiet]
        return Peer(name, argv + shlex.split(settings.ours_args), port, options)
    if name == "baseline":
        script = str(Path(__file__).with_name("baseline_server.py"))
        return Peer(name, [sys.executable, script, "--model", settings.original_dir, *where], port, options)
    if name != "transformers":
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    python = settings.transformers_python
    if not python or not Path(python).exists():
        raise PeerUnavailable(
            f"no Python at --transformers-serve-python={python!r}; `transformers serve` needs torchvision, "
            "which does not import beside this venv's torch: create its own virtualenv (benchmarks/README.md)"
        )
    model_dir = transformers_serve_dir(python, settings.hf_dir, settings.work_dir)
    argv = [python, "-m", "transformers.cli.transformers", "serve", model_dir, *where]
    # It pins every request to the directory it was started with, and wants exactly that name.
    options = RequestOptions(model_dir, settings.max_tokens)
    return Peer(name, argv + shlex.split(settings.transformers_args), port, options)


def _log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> str:
    """SIGTERM, then SIGKILL to the peer's own process group if it has not exited within grace_s."""
    if proc.poll() is not None:
        return f"had already exited with code {proc.returncode}"
    proc.send_signal(signal.SIGTERM)
    try:
        return f"stopped by SIGTERM, exit code {proc.wait(timeout=grace_s)}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"did not stop within {grace_s:g} s of SIGTERM; killed"


@contextlib.contextmanager
def running(peer: Peer, log_dir: Path, startup_timeout_s: float) -> Iterator[str]:
    """Start `peer`, wait until its health path answers 200, yield its base URL; stop it on the way out.

    RuntimeError (with the log's tail) when it exits or is not ready within startup_timeout_s.
    """
    log = log_dir / f"{peer.name}.log"
    print(f"[{peer.name}] starting: {shlex.join(peer.argv)}\n[{peer.name}] log: {log}", flush=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            peer.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **OFFLINE_ENV},
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{peer.port}"
    started = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"exited with code {proc.returncode} while starting; log tail:\n{_log_tail(log)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + peer.health_path, timeout=2.0, trust_env=False).status_code == 200:
                    break
            if time.perf_counter() - started > startup_timeout_s:
                raise RuntimeError(f"not ready after {startup_timeout_s:g} s; log tail:\n{_log_tail(log)}")
            time.sleep(0.5)
        print(f"[{peer.name}] ready in {time.perf_counter() - started:.1f} s", flush=True)
        yield base + "/v1"
    finally:
        print(f"[{peer.name}] {_stop(proc)}", flush=True)
