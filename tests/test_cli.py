"""The first hour with `internvl-serve`: --version, a --help that shows types, choices and groups,
a 404 that names the right base URL, and a start (and a first answer) without a single warning."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, parse_settings
from server.settings import Settings, option_order
from tests.app_client import MODEL, make_app
from tests.server_process import LEAN_FLAGS, ServerProcess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"internvl-serve {version('internvl-serve')}"


def test_help_shows_groups_types_and_choices() -> None:
    text = build_parser().format_help()
    assert "VALUE" not in text
    for group in ("serving:", "security:", "media fetching and request limits:", "model loading:",
                  "engine: batching, KV cache and memory:", "images and videos:"):  # fmt: skip
        assert f"\n{group}\n" in text, group
    for shown in (
        "--port PORT",
        "--max-n INT",
        "--media-fetch-timeout-s SECONDS",
        "--max-image-bytes BYTES",
        "--kv-cache-memory-gib GIB",
        "--log-level {critical,error,warning,info,debug,trace}",
        "--quantization {8bit,4bit,none}",
        "--cache-isolation {shared,api_key}",
        "--dtype {auto,bfloat16,float16,float32}",
        "--allowed-local-media-path DIR",
        "--model DIR|HUB_ID|demo",
    ):
        assert shown in text, shown
    # Every setting is in exactly one group, in option_order().
    flags = [
        a.dest for g in build_parser()._action_groups[2:] for a in g._group_actions if a.dest != "config"
    ]
    assert flags == option_order() and set(flags) == set(Settings.model_fields)


def test_choices_are_checked_and_none_means_unset(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings(["--quantization", "none", "--log-level", "debug"], {}).quantization is None
    with pytest.raises(SystemExit) as info:
        parse_settings(["--log-level", "loud"], {})
    assert info.value.code == 2 and "invalid choice: 'loud'" in capsys.readouterr().err


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "/chat/completions", "POST /v1/chat/completions"),
        ("POST", "/responses", "POST /v1/responses"),
        ("GET", "/models", "GET /v1/models"),
        ("GET", f"/models/{MODEL}", f"GET /v1/models/{MODEL}"),
        ("POST", "/v1/v1/chat/completions", "POST /v1/chat/completions"),
    ],
)
async def test_a_path_without_v1_names_the_base_url(method: str, path: str, route: str) -> None:
    app = make_app()
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://10.1.2.3:8000") as client,
    ):
        r = await client.request(method, path, json={})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "not_found" and error["type"] == "invalid_request_error"
    assert "base URL is http://10.1.2.3:8000/v1" in error["message"] and route in error["message"]


@pytest.mark.anyio
async def test_an_unknown_path_is_a_plain_404() -> None:
    app = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.get("/nothing/here")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not found."


@pytest.mark.e2e
def test_a_clean_start_and_first_answers_print_no_warning(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("clean-start") / "tiny", seed=0)
    # `default` shows every warning once, DeprecationWarnings included (Python hides those by default).
    server = ServerProcess(checkpoint, tmp_path, args=LEAN_FLAGS, env={"PYTHONWARNINGS": "default"})
    try:
        server.start().wait_healthy()
        for content in ("hello", [{"type": "text", "text": "hi"}]):
            body = {
                "model": "tiny-internvl",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 2,
            }
            r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60, trust_env=False)
            assert r.status_code == 200, r.text
    finally:
        assert server.stop() == 0
    lines = server.logs().splitlines()[1:]  # the first is the command line
    noisy = [line for line in lines if "Warning" in line or " WARNING " in line or "Traceback" in line]
    assert not noisy, "\n".join(noisy)


def test_batch_cli_is_installed() -> None:
    # The console script pyproject.toml declares (pip install -e . writes it).
    proc = subprocess.run(
        [sys.executable, "-m", "batch.cli", "--version"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("internvl-batch ")
