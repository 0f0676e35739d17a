"""The two files of a batch job: OpenAI Batch input rows in, OpenAI Batch output lines out.

Input (BatchRequestInput): one JSON object per line, `{"custom_id", "method": "POST", "url", "body"}`.
Output (BatchRequestOutput): one line per row, in the order rows finish:
`{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`
for every row the API answered (an HTTP error too: its status and OpenAI's error body, as OpenAI's
batch output reports it), and `{"id", "custom_id", "response": null, "error": {"code", "message",
"line"}}` for a row that never reached the API (malformed line, duplicate custom_id, unsupported
url or method, `stream: true`), naming its line; `custom_id` is "" when the line has no usable one
(OpenAI's schema wants a string; a valid custom_id is never empty).

Crash safety: each line is one write(2) of the whole line on a file opened for appending, flushed
at once and fsync'd every second; a rerun truncates a torn last line (a write cut by a power loss)
and skips every row the file already answers: by custom_id, or by line number for the line-level
errors that have no usable (or no unique) custom_id.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# A line longer than the largest request body plus room for the envelope is refused unread.
ENVELOPE_BYTES = 64 * 1024
_READ_CHUNK = 1 << 20


class OutputFileError(Exception):
    """The output file cannot be resumed (a complete line that is not one of ours)."""


@dataclass(frozen=True)
class Row:
    """One input row that goes to the API: its line, custom_id, url and body (compact JSON)."""

    line: int
    custom_id: str
    url: str
    body: bytes


@dataclass(frozen=True)
class LineError:
    """An input line answered without the API: the output line to write for it."""

    line: int
    custom_id: str  # "" when the line has none
    code: str
    message: str

    def record(self) -> dict[str, Any]:
        return error_record(self.custom_id, self.code, self.message, line=self.line)


@dataclass
class Done:
    """What an existing output file already answers."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)  # line-level errors (no usable custom_id)
    records: int = 0
    failed: int = 0
    truncated_bytes: int = 0  # the torn last line removed

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        self.failed += is_failure(record)
        error = record.get("error") or {}
        line = error.get("line") if isinstance(error, dict) else None
        custom_id = record.get("custom_id")
        if isinstance(line, int) and error.get("code") in LINE_KEYED:
            self.lines.add(line)
        elif isinstance(custom_id, str) and custom_id:
            self.ids.add(custom_id)


DUPLICATE = "duplicate_custom_id"
# Line-level errors whose line has no custom_id of its own: a rerun knows them by line number.
LINE_KEYED = frozenset(
    {"line_too_large", "invalid_json_line", "invalid_request", "missing_required_parameter", DUPLICATE}
)


# -- output lines -----------------------------------------------------------------------------------


def new_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_record(custom_id: str, status_code: int, request_id: str, body: Any) -> dict[str, Any]:
    response = {"status_code": status_code, "request_id": request_id, "body": body}
    return {"id": new_id(), "custom_id": custom_id, "response": response, "error": None}


def error_record(custom_id: str, code: str, message: str, *, line: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return {"id": new_id(), "custom_id": custom_id, "response": None, "error": error}


def is_failure(record: dict[str, Any]) -> bool:
    """OpenAI's error file holds these: a non-HTTP error, or an HTTP status of 400 or above."""
    if record.get("error") is not None:
        return True
    response = record.get("response")
    return not isinstance(response, dict) or int(response.get("status_code", 0)) >= 400


def output_tokens(record: dict[str, Any]) -> int:
    """Generated tokens of an answered row (chat and completions: completion_tokens; responses:
    output_tokens); 0 when there are none."""
    response = record.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    tokens = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return tokens if isinstance(tokens, int) else 0


def encode_line(record: dict[str, Any]) -> bytes:
    """One output line, UTF-8; text that UTF-8 cannot carry (a lone surrogate) is \\u-escaped."""
    try:
        return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")


class OutputWriter:
    """Appends whole lines: one write per line (so a killed process leaves no partial line short
    of a power loss), flushed to the OS at once, fsync'd at most every `fsync_interval_s`."""

    def __init__(self, path: Path, *, fsync_interval_s: float = 1.0) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync_interval_s = fsync_interval_s
        self._last_sync = time.monotonic()
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(encode_line(record))

    def write_line(self, line: bytes) -> None:
        assert line.endswith(b"\n") and line.count(b"\n") == 1, "one whole line at a time"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        self.written += 1
        if time.monotonic() - self._last_sync >= self._fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._fd)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_done(path: Path) -> Done:
    """What `path` already answers, after truncating a torn last line; OutputFileError when a
    complete line is not a batch output line."""
    done = Done()
    if not path.exists():
        return done
    good_end = 0
    with path.open("r+b") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                break  # torn: cut below
            try:
                record = json.loads(raw)
            except ValueError:
                raise OutputFileError(
                    f"{path}, line {number}: not JSON; is this a batch output file?"
                ) from None
            if not isinstance(record, dict) or "custom_id" not in record:
                raise OutputFileError(f"{path}, line {number}: not a batch output line")
            done.add(record)
            good_end += len(raw)
        size = file.seek(0, os.SEEK_END)
        if size > good_end:
            file.truncate(good_end)
            file.flush()
            os.fsync(file.fileno())
            done.truncated_bytes = size - good_end
    return done


# -- input rows -------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Lines of the input (the progress bar's total; blank lines, which are skipped, count too)."""
    lines = 0
    last = b"\n"
    with path.open("rb") as file:
        while chunk := file.read(_READ_CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def read_rows(path: Path, done: Done, *, max_line_bytes: int) -> Iterator[Row | LineError]:
    """The input's rows not yet answered in `done`, in order: a Row to send, or a LineError to write."""
    seen: dict[str, int] = {}
    with path.open("rb") as file:
        for number, raw in _lines(file, max_line_bytes):
            if raw is None:
                if number not in done.lines:
                    yield LineError(
                        number, "", "line_too_large", f"line {number} is over {max_line_bytes} bytes"
                    )
                continue
            if not raw.strip():
                continue
            item = _parse(number, raw, seen)
            if isinstance(item, LineError):
                if (number in done.lines) if item.code in LINE_KEYED else (item.custom_id in done.ids):
                    continue
                yield item
            elif item.custom_id not in done.ids:
                yield item


def _lines(file: Any, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; None for a line over `max_line_bytes`, skipped unread."""
    number = 0
    while True:
        raw = file.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := file.readline(_READ_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, raw


def _parse(number: int, raw: bytes, seen: dict[str, int]) -> Row | LineError:
    try:
        item = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        return LineError(number, "", "invalid_json_line", f"line {number} is not valid JSON ({_reason(exc)})")
    if not isinstance(item, dict):
        return LineError(number, "", "invalid_request", f"line {number} is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        what = "has no custom_id" if custom_id is None else "has a custom_id that is not a non-empty string"
        return LineError(number, "", "missing_required_parameter", f"line {number} {what}")
    if custom_id in seen:
        return LineError(
            number,
            custom_id,
            DUPLICATE,
            f"line {number}: custom_id {custom_id!r} was already used on line {seen[custom_id]}",
        )
    seen[custom_id] = number
    method, url, body = item.get("method"), item.get("url"), item.get("body")
    if method != "POST":
        return LineError(
            number, custom_id, "invalid_method", f"line {number}: method must be POST, not {method!r}"
        )
    if url not in SUPPORTED_URLS:
        return LineError(
            number,
            custom_id,
            "invalid_url",
            f"line {number}: url {url!r} is not supported; use one of {', '.join(SUPPORTED_URLS)}",
        )
    if not isinstance(body, dict):
        return LineError(number, custom_id, "invalid_body", f"line {number}: body must be a JSON object")
    if body.get("stream") is True:
        return LineError(
            number,
            custom_id,
            "stream_not_supported",
            f"line {number}: batch rows cannot stream; remove 'stream' (the whole answer is written)",
        )
    return Row(number, custom_id, url, json.dumps(body, separators=(",", ":")).encode())


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    return "invalid"
