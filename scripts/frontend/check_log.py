"""Judge the chat from the logging proxy's record (and the server's log); exit 1 if it failed.

    python check_log.py EXCHANGES.jsonl SERVER.log

Passes when: every exchange got a 2xx; there were at least two chat completions, both streamed to
`[DONE]` with some content and no error event; the first one's last user message was an image and
nothing else (how Gradio sends an upload); a later one asked a text question; and the server logged
no ERROR line or traceback. Prints each chat request (data: URIs shortened) and its answer.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def answer_of(events: list[Any]) -> tuple[str, list[str]]:
    """The streamed text, and what is wrong with the stream."""
    problems: list[str] = []
    text = ""
    if not events or events[-1] != "[DONE]":
        problems.append("the stream did not end with [DONE]")
    for event in events:
        if isinstance(event, dict):
            if "error" in event:
                problems.append(f"error event: {json.dumps(event['error'])}")
            for choice in event.get("choices") or []:
                text += (choice.get("delta") or {}).get("content") or ""
        elif event != "[DONE]":
            problems.append(f"unparsable event: {event!r}")
    if not text:
        problems.append("no content was streamed")
    return text, problems


def part_types(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return ["text"]
    return [part.get("type", "?") for part in content or []]


def main() -> int:
    if len(sys.argv) != 3:
        print(f"usage: {sys.argv[0]} EXCHANGES.jsonl SERVER.log", file=sys.stderr)
        return 2
    exchanges_path, server_log = sys.argv[1:]
    with open(exchanges_path, encoding="utf-8") as f:
        exchanges = [json.loads(line) for line in f if line.strip()]
    failures: list[str] = []

    for x in exchanges:
        if not 200 <= x["status"] < 300:
            failures.append(f"{x['method']} {x['path']} -> {x['status']}: {json.dumps(x['response'])}")

    chats = [x for x in exchanges if x["method"] == "POST" and x["path"].endswith("/chat/completions")]
    if len(chats) < 2:
        failures.append(f"expected at least 2 chat completions, the proxy saw {len(chats)}")
    for i, x in enumerate(chats, 1):
        request = x["request"] if isinstance(x["request"], dict) else {}
        print(f"chat {i}: request  {json.dumps(request, ensure_ascii=False)}")
        print(f"chat {i}: status   {x['status']}")
        response = x["response"]
        if not (isinstance(response, dict) and "sse" in response):
            failures.append(f"chat {i} was not streamed: {json.dumps(response)[:500]}")
            continue
        text, problems = answer_of(response["sse"])
        print(f"chat {i}: answer   {json.dumps(text, ensure_ascii=False)} ({len(response['sse'])} events)")
        failures += [f"chat {i}: {p}" for p in problems]

    if chats:
        messages = chats[0]["request"].get("messages", []) if isinstance(chats[0]["request"], dict) else []
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        if part_types(last_user) != ["image_url"]:
            failures.append(f"chat 1 was not an image-only user message: parts {part_types(last_user)}")
    if len(chats) >= 2:
        messages = chats[-1]["request"].get("messages", []) if isinstance(chats[-1]["request"], dict) else []
        if not messages or part_types(messages[-1]) != ["text"]:
            failures.append("the last chat did not end with a text question")

    with open(server_log, encoding="utf-8", errors="replace") as f:
        bad = [line.rstrip() for line in f if " ERROR " in line or line.startswith("Traceback")]
    failures += [f"server log: {line}" for line in bad]

    for failure in failures:
        print(f"FAIL: {failure}")
    if failures:
        return 1
    print(f"OK: {len(chats)} streamed chat completions, the first an image-only message; no errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
