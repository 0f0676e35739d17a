"""internvl-batch (batch/): input rows and resume as pure functions; output lines against OpenAI's
schema; the CLI end to end on the tiny checkpoint (bad rows, killed and resumed); Ray Data with two
CPU replicas; the KubeRay RayJob manifest against KubeRay's CRD schema, offline.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from batch.cli import EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, parse
from batch.jsonl import (
    Done,
    LineError,
    OutputFileError,
    OutputWriter,
    Row,
    error_record,
    read_done,
    read_rows,
    response_record,
)
from batch.progress import Progress
from batch.runner import BATCH_STEP_TIME_TARGET_MS, batch_settings
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
RAYJOB = REPO / "configs" / "kubernetes" / "batch" / "rayjob.yaml"
RAY_DOCKERFILE = REPO / "configs" / "kubernetes" / "batch" / "Dockerfile"
BATCH_PVC = REPO / "configs" / "kubernetes" / "batch" / "pvc.yaml"
MODEL = "tiny-internvl"
RUN_TIMEOUT_S = 300


# -- helpers ---------------------------------------------------------------------------------------


def chat_row(custom_id: str, content: Any, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def greedy_rows(count: int, max_tokens: int = 12) -> list[dict[str, Any]]:
    """Text rows and (every fourth) rows with an image of their own: distinct prompts, greedy."""
    rows = []
    for i in range(count):
        if i % 4 == 0:
            content: Any = [
                image_part(data_uri(png(40 + i, 32, seed=i))),
                {"type": "text", "text": f"what is {i}?"},
            ]
        else:
            content = f"row {i}: tell me about the number {i * 7}"
        rows.append(chat_row(f"row-{i:03d}", content, max_tokens=max_tokens))
    return rows


def write_jsonl(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert not raw or raw.endswith(b"\n"), "a partial last line"
    return [json.loads(line) for line in raw.splitlines()]


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), (
        f"custom_ids written twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    )
    return {r["custom_id"]: r for r in records}


_VOLATILE = {
    "id",
    "created",
    "created_at",
    "completed_at",
    "request_id",
    "cached_tokens",
    "cache_write_tokens",
}


def comparable(value: Any) -> Any:
    """A record without what differs between two runs of the same greedy rows: ids, times, and the
    prefix cache's hit counts."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def batch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTERNVL_", "RAY_"))}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0"
    )
    return env


def batch_command(checkpoint: Path, input_path: Path, output: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "batch.cli", "--model", str(checkpoint), "--served-model-name", MODEL,
        "--device", "cpu", "--input", str(input_path), "--output", str(output), *flags,
    ]  # fmt: skip


def run_batch(*command: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, env=batch_env(), capture_output=True, text=True, timeout=timeout)


def openai_schema(name: str) -> dict[str, Any]:
    """One of OpenAI's batch line schemas (OpenAPI 3.0) as JSON Schema: `nullable` becomes a null type."""
    document = json.loads((DATA / "openai-openapi" / "batch-subset.json").read_text())

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: convert(v) for k, v in node.items() if not k.startswith("x-")}
            if node.pop("nullable", False):
                node = {"anyOf": [node, {"type": "null"}]}
            return node
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    return convert(document["components"]["schemas"][name])


OUTPUT_SCHEMA = openai_schema("BatchRequestOutput")


def assert_openai_line(record: dict[str, Any]) -> None:
    jsonschema.validate(record, OUTPUT_SCHEMA)
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert record["id"].startswith("batch_req_")
    assert (record["response"] is None) != (record["error"] is None)


# -- input rows, output lines and resume (pure) ------------------------------------------------------


def test_bad_lines_become_line_errors_naming_their_line(tmp_path: Path) -> None:
    good = chat_row("a", "hi")
    lines = [
        json.dumps(good),
        "{not json",
        "[1, 2]",
        json.dumps({**good, "custom_id": None}),
        json.dumps({**good, "custom_id": 7}),
        json.dumps(good),  # duplicate of line 1
        json.dumps({**good, "custom_id": "m", "method": "GET"}),
        json.dumps({**good, "custom_id": "u", "url": "/v1/embeddings"}),
        json.dumps({**good, "custom_id": "b", "body": "text"}),
        json.dumps(chat_row("s", "hi", stream=True)),
        "   ",
        json.dumps(chat_row("z", "x" * 500)),
        json.dumps(chat_row("last", "bye")),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines)).encode() + b"\n\xff\xfe\n")
    items = list(read_rows(path, Done(), max_line_bytes=400))
    rows = [i for i in items if isinstance(i, Row)]
    errors = {i.line: i for i in items if isinstance(i, LineError)}
    assert [(r.line, r.custom_id) for r in rows] == [(1, "a"), (13, "last")]
    assert json.loads(rows[0].body) == good["body"]
    expected = {
        2: ("", "invalid_json_line"),
        3: ("", "invalid_request"),
        4: ("", "missing_required_parameter"),
        5: ("", "missing_required_parameter"),
        6: ("a", "duplicate_custom_id"),
        7: ("m", "invalid_method"),
        8: ("u", "invalid_url"),
        9: ("b", "invalid_body"),
        10: ("s", "stream_not_supported"),
        12: ("", "line_too_large"),
        14: ("", "invalid_json_line"),
    }
    assert {n: (e.custom_id, e.code) for n, e in errors.items()} == expected
    for number, error in errors.items():
        assert f"line {number}" in error.message
        record = error.record()
        assert_openai_line(record)
        assert record["error"]["line"] == number
    assert "line 1" in errors[6].message  # names where the custom_id was used first


def test_rerun_skips_what_the_output_answers(tmp_path: Path) -> None:
    lines = [json.dumps(chat_row(c, "hi")) for c in ("a", "b", "c")] + [
        "oops",
        json.dumps(chat_row("a", "x")),
    ]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    first = list(read_rows(path, Done(), max_line_bytes=10_000))
    done = Done()
    done.add(response_record("a", 200, "r1", {}))
    done.add(response_record("c", 400, "r2", {"error": {}}))
    for item in first:
        if isinstance(item, LineError):
            done.add(item.record())
    again = list(read_rows(path, done, max_line_bytes=10_000))
    assert [(type(i).__name__, i.custom_id) for i in again] == [("Row", "b")]
    assert (done.records, done.failed) == (4, 3)


def test_a_torn_last_line_is_truncated_and_a_foreign_file_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as writer:
        writer.write(response_record("a", 200, "r", {"x": 1}))
        writer.write(error_record("", "invalid_json_line", "line 2 is not valid JSON", line=2))
    whole = out.read_bytes()
    with out.open("ab") as file:
        file.write(b'{"id":"batch_req_1","custom_id":"b","resp')
    done = read_done(out)
    assert (done.ids, done.lines, done.records, done.failed) == ({"a"}, {2}, 2, 1)
    assert done.truncated_bytes > 0 and out.read_bytes() == whole
    assert read_done(out).truncated_bytes == 0
    (tmp_path / "foreign.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(OutputFileError, match="line 1"):
        read_done(tmp_path / "foreign.jsonl")
    (tmp_path / "garbage.jsonl").write_bytes(b"\x00\x00\n" + whole)
    with pytest.raises(OutputFileError, match="not JSON"):
        read_done(tmp_path / "garbage.jsonl")


def test_output_lines_are_openai_batch_lines(tmp_path: Path) -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": {"completion_tokens": 3}}
    records = [
        response_record("a", 200, "req-1", body),
        response_record(
            "b", 413, "req-2", {"error": {"message": "too big", "type": "x", "param": None, "code": "y"}}
        ),
        error_record("c", "stream_not_supported", "line 3: batch rows cannot stream", line=3),
        error_record("", "invalid_json_line", "line 4 is not valid JSON", line=4),
        response_record("d", 200, "req-3", {"text": "\ud800 lone surrogate"}),
    ]
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as writer:
        for record in records:
            writer.write(record)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(records) + 1
    for record in read_output(out):
        assert_openai_line(record)
    input_schema = openai_schema("BatchRequestInput")
    for row in greedy_rows(2):
        jsonschema.validate(row, input_schema)


def test_progress_bar_and_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    bar = Progress(4, stream=stream, bar=True)
    bar.update(response_record("a", 200, "r", {"usage": {"completion_tokens": 5}}))
    bar.update(error_record("b", "invalid_url", "no"))
    bar.close()
    assert "2/4" in stream.getvalue() and "tok/s" in stream.getvalue() and "1 failed" in stream.getvalue()
    quiet = Progress(10, stream=io.StringIO(), interval_s=0.0)
    with caplog.at_level("INFO", logger="batch.progress"):
        quiet.update(response_record("a", 200, "r", {"usage": {"output_tokens": 7}}))
    assert re.search(r"rows 1/10 \(10\.0%\), [\d.]+ rows/s, [\d.]+ tok/s, 0 failed, .*ETA", caplog.text)
    assert quiet.tokens == 7


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--output", "o.jsonl", "--model", "m"], "--input"),
        (["--input", "{input}", "--output", "o.jsonl"], "no model given"),
        (["--input", "{input}", "--output", "{input}", "--model", "m"], "must not be the input"),
        (["--input", "missing.jsonl", "--output", "o.jsonl", "--model", "m"], "no such file"),
        (["--input", "{input}", "--output", "o.jsonl", "--model", "m", "--replicas", "2"], "needs --ray"),
        (["--input", "{input}", "--output", "o.jsonl", "--model", "m", "--concurrency", "0"], "at least 1"),
        (["--input", "{input}", "--output", "o.jsonl", "--model", "m", "--port", "1"], "unrecognized"),
        (["--input", "{input}", "--output", "o.jsonl", "--model", "m", "--max-n", "0"], "max_n"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_row("a", "hi")])
    argv = [a.replace("{input}", str(input_path)) for a in argv]
    with pytest.raises(SystemExit) as info:
        parse(argv, {})
    assert info.value.code == EXIT_USAGE and needle in capsys.readouterr().err


def test_settings_reach_the_job() -> None:
    job, settings = parse(
        [
            "--input",
            __file__,
            "--output",
            "o.jsonl",
            "--model",
            "m",
            "--max-num-seqs",
            "8",
            "--max-image-bytes",
            "9",
        ],
        {"INTERNVL_ALLOWED_LOCAL_MEDIA_PATH": "/data"},
    )
    assert (settings.max_num_seqs, settings.max_image_bytes, settings.allowed_local_media_path) == (
        8,
        9,
        "/data",
    )
    assert job.concurrency == 12 and job.max_line_bytes > settings.max_body_bytes


def test_a_batch_job_sizes_its_steps_for_throughput_unless_told() -> None:
    settings = Settings(model="m", api_keys=["k"])
    assert settings.step_time_target_ms is None  # the server protects running streams
    job = batch_settings(settings)
    assert job.step_time_target_ms == BATCH_STEP_TIME_TARGET_MS and job.api_keys == []
    chosen = settings.model_copy(update={"step_time_target_ms": 50.0})
    assert batch_settings(chosen).step_time_target_ms == 50.0


# -- end to end, on the tiny checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("batch-checkpoint") / "tiny", seed=0)


@pytest.mark.e2e
def test_bad_rows_become_error_lines_and_the_job_goes_on(checkpoint: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "small.png").write_bytes(png(32, 24, seed=1))
    (media / "large.png").write_bytes(png(200, 200, seed=2))  # ~120 KB, over --max-image-bytes
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(32, 24, seed=3))
    question = {"type": "text", "text": "what is it?"}
    rows: list[Any] = [
        chat_row("text", "hello"),
        chat_row("file-url", [image_part(f"file://{media / 'small.png'}"), question]),
        chat_row("absolute-path", [image_part(str(media / "small.png")), question]),
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": "abc", "max_tokens": 4, "temperature": 0}},
        {"custom_id": "response", "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": "abc", "max_output_tokens": 4, "temperature": 0}},
        '{"custom_id": "broken", "method": "POST", ',
        {"custom_id": "unknown-url", "method": "POST", "url": "/v1/images/generations", "body": {}},
        chat_row("missing-file", [image_part(str(media / "nope.png")), question]),
        chat_row("outside", [image_part(str(outside)), question]),
        chat_row("dot-dot", [image_part(f"{media}/../outside.png"), question]),
        chat_row("oversized", [image_part(str(media / "large.png")), question]),
        chat_row("corrupt-data-uri", [image_part("data:image/png;base64,iVBORw0KGgo="), question]),
        chat_row("streamed", "hello", stream=True),
        chat_row("text", "again"),
        chat_row("unknown-model", "hello", model="gpt-4o"),
        chat_row("after-the-bad-ones", "still running"),
    ]  # fmt: skip
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    flags = ["--allowed-local-media-path", str(media), "--max-image-bytes", "60000"]
    proc = run_batch(*batch_command(checkpoint, input_path, out, *flags))
    assert proc.returncode == EXIT_ROWS_FAILED, proc.stderr[-3000:]
    records = read_output(out)
    for record in records:
        assert_openai_line(record)
    assert len(records) == len(rows)
    line_errors = {r["error"]["line"]: r for r in records if r["error"] is not None}
    answered = {r["custom_id"]: r["response"] for r in records if r["response"] is not None}
    assert {n: (r["custom_id"], r["error"]["code"]) for n, r in line_errors.items()} == {
        6: ("", "invalid_json_line"),
        7: ("unknown-url", "invalid_url"),
        13: ("streamed", "stream_not_supported"),
        14: ("text", "duplicate_custom_id"),
    }
    for name in ("text", "file-url", "absolute-path", "completion", "response", "after-the-bad-ones"):
        assert answered[name]["status_code"] == 200, answered[name]
    refused = {
        "missing-file": (400, "does not exist"),
        "outside": (400, "outside the allowed directory"),
        "dot-dot": (400, "without '..'"),
        "oversized": (413, "60000"),
        "corrupt-data-uri": (400, ""),
        "unknown-model": (404, "gpt-4o"),
    }
    for name, (status, words) in refused.items():
        response = answered[name]
        assert response["status_code"] == status, (name, response)
        assert words in response["body"]["error"]["message"], (name, response)
        assert response["request_id"]
    # Each refusal is logged with its custom_id and line.
    assert "row oversized (line 11): 413" in proc.stderr
    # A rerun has nothing to do: it writes nothing, loads no model, and reports the same failures.
    again = run_batch(*batch_command(checkpoint, input_path, out, *flags))
    assert again.returncode == EXIT_ROWS_FAILED, again.stderr[-3000:]
    assert read_output(out) == records
    assert "loaded" not in again.stderr


def kill_when(proc: subprocess.Popen[bytes], out: Path, lines: int, timeout_s: float = RUN_TIMEOUT_S) -> bool:
    """SIGKILL `proc` once `out` holds at least `lines` lines; False if it finished first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"the batch job wrote fewer than {lines} lines in {timeout_s} s")


@pytest.mark.e2e
def test_killed_three_times_then_resumed_equals_an_uninterrupted_run(
    checkpoint: Path, tmp_path: Path
) -> None:
    rows = greedy_rows(60, max_tokens=16)
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["--concurrency", "8", "--log-level", "warning"]
    reference = tmp_path / "reference.jsonl"
    proc = run_batch(*batch_command(checkpoint, input_path, reference, *flags))
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]

    out = tmp_path / "out.jsonl"
    command = batch_command(checkpoint, input_path, out, *flags)
    rng = random.Random(15)
    kills = 0
    for n in range(3):
        written = out.read_bytes().count(b"\n") if out.exists() else 0
        with (tmp_path / f"run-{n}.log").open("wb") as log:
            proc = subprocess.Popen(command, cwd=REPO, env=batch_env(), stdout=log, stderr=subprocess.STDOUT)
        # SIGKILL at a random point: after 2 to 14 more rows.
        kills += kill_when(proc, out, min(written + rng.randint(2, 14), len(rows) - 5))
        if n == 1:
            # What a power loss can leave: the start of a line, never finished.
            with out.open("ab") as file:
                file.write(b'{"id":"batch_req_torn","custom_id":"row-0')
    assert kills == 3, "every run was to be killed before it finished"
    assert "torn last line" in (tmp_path / "run-2.log").read_text()
    final = run_batch(*command)
    assert final.returncode == EXIT_OK, final.stderr[-3000:]
    assert b"batch_req_torn" not in out.read_bytes()

    records = read_output(out)  # every line whole
    got, want = by_id(records), by_id(read_output(reference))
    assert set(got) == {row["custom_id"] for row in rows}
    for custom_id, record in want.items():
        assert_openai_line(got[custom_id])
        assert comparable(got[custom_id]) == comparable(record), custom_id


@pytest.mark.e2e
def test_ray_two_cpu_replicas_equal_one_process_and_resume(checkpoint: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("ray") is None:  # not imported here: the job runs in a subprocess
        pytest.skip("needs the ray extra: pip install -e '.[ray]'")
    rows = greedy_rows(12)
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    single = tmp_path / "single.jsonl"
    proc = run_batch(*batch_command(checkpoint, input_path, single, "--log-level", "warning"))
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    reference = read_output(single)

    # The Ray job resumes a file that already holds four rows and a torn fifth.
    out = tmp_path / "ray.jsonl"
    head = b"".join(single.read_bytes().splitlines(keepends=True)[:4])
    out.write_bytes(head + b'{"id":"batch_req_torn","cus')
    started = time.monotonic()
    command = batch_command(checkpoint, input_path, out, "--ray", "--replicas", "2", "--concurrency", "4")
    proc = run_batch(*command)
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_OK, proc.stderr[-5000:]
    assert out.read_bytes().startswith(head)
    assert "Ray: 8 rows, 2 replicas of 1 CPU" in proc.stderr
    got, want = by_id(read_output(out)), by_id(reference)
    assert set(got) == set(want)
    for custom_id, record in want.items():
        assert comparable(got[custom_id]) == comparable(record), custom_id
    print(f"Ray job (2 CPU replicas, 8 rows): {elapsed:.1f} s")


# -- KubeRay: the RayJob manifest ---------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubernetes-validate --strict` does for built-in
    kinds (the API server would prune them silently): every object that lists its properties gets
    no others, unless it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft4Validator:
    # A CRD's openAPIV3Schema is OpenAPI 3.0's schema dialect: JSON Schema draft 4 with extensions.
    schema = strict(json.loads((DATA / "kuberay" / "rayjob-v1.schema.json").read_text()))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def rayjob() -> dict[str, Any]:
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_passes_kuberays_schema(rayjob_validator: jsonschema.Draft4Validator) -> None:
    manifest = rayjob()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_validator.iter_errors(manifest)
    ]
    assert not errors, errors


@pytest.mark.parametrize(
    "path",
    [
        ("spec", "entrypont"),
        ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicyy"),
        ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"),
    ],
)
def test_rayjob_schema_check_rejects_an_unknown_field(
    rayjob_validator: jsonschema.Draft4Validator, path: tuple[Any, ...]
) -> None:
    manifest = copy.deepcopy(rayjob())
    node: Any = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    messages = [e.message for e in rayjob_validator.iter_errors(manifest)]
    assert any(repr(path[-1]) in m for m in messages), messages


def test_rayjob_runs_a_valid_batch_command_on_its_gpus() -> None:
    manifest = rayjob()
    command, _, tail = manifest["spec"]["entrypoint"].partition(";")
    argv = shlex.split(command)
    assert argv[0] == "internvl-batch" and tail.strip() == "test $? -le 1"
    job_argv = [a.replace("/data/input.jsonl", __file__) for a in argv[1:]]  # an input that exists here
    job, settings = parse(job_argv, {})
    cluster = manifest["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert job.ray and job.replicas == workers["replicas"] * gpus == workers["maxReplicas"] * gpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    assert settings.allowed_local_media_path == "/data/media"
    images = {
        c["image"]
        for group in [cluster["headGroupSpec"], workers]
        for c in group["template"]["spec"]["containers"]
    }
    assert images == {"internvl-serve-ray:0.1.0"}
    # The image's Ray is the rayVersion, and one the `ray` extra allows.
    pinned = re.search(r'"ray\[data\]==([\d.]+)"', RAY_DOCKERFILE.read_text())
    assert pinned and pinned.group(1) == cluster["rayVersion"]
    extra = re.search(r'^ray = \["ray\[data\]>=([\d.]+)"\]', (REPO / "pyproject.toml").read_text(), re.M)
    assert extra and tuple(map(int, pinned.group(1).split("."))) >= tuple(map(int, extra.group(1).split(".")))


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def test_ray_image_and_data_volume_pass_their_validators() -> None:
    proc = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", str(BATCH_PVC)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stdout + proc.stderr
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in _volumes(rayjob()) if "persistentVolumeClaim" in v
    }
    assert yaml.safe_load(BATCH_PVC.read_text())["metadata"]["name"] in claims
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(RAY_DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _volumes(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        yield from group["template"]["spec"].get("volumes", [])
