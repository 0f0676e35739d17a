"""Tool calls out of a streamed answer: content until a call starts, then whole calls as deltas.

Text is passed on as content as it arrives, except a tail that could be the beginning of the
format's call marker, which waits until the next piece decides. Once a call starts, its text is
held until the call is complete (its closing marker, or the end of the answer), then parsed and
sent as OpenAI streams calls: a delta with the call's index, id, type and name (arguments ""),
then one with its arguments. A call that does not parse is sent as content instead, so a client
never receives a tool_calls object that is not valid JSON.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from model_runtime.inputs.tools import ParsedCall, ToolFormat

_ID_ALPHABET = string.ascii_letters + string.digits


def call_id() -> str:
    """An id in OpenAI's shape: call_ and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class StreamedCall:
    index: int
    id: str
    call: ParsedCall


class ToolCallStream:
    """Splits one choice's streamed text into content and tool calls (see the module docstring)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self._fmt = fmt
        self._held = ""  # content held back (a possible marker start), or the text of calls
        self._in_calls = False
        self.calls: list[StreamedCall] = []

    def feed(self, text: str) -> tuple[str, list[StreamedCall]]:
        """(content to send now, calls this piece completed)."""
        text = self._held + text
        self._held = ""
        if not self._in_calls:
            start = text.find(self._fmt.call_start)
            if start < 0:
                keep = _marker_prefix_length(text, self._fmt.call_start)
                self._held = text[len(text) - keep :]
                return self._fmt.clean(text[: len(text) - keep]), []
            self._in_calls = True
            content, text = text[:start], text[start:]
        else:
            content = ""
        content_after, calls = self._take_calls(text, final=False)
        return self._fmt.clean(content + content_after), calls

    def finish(self) -> tuple[str, list[StreamedCall]]:
        """At the end of the answer: what is still held, as content or as the last calls."""
        text, self._held = self._held, ""
        if not self._in_calls:
            return self._fmt.clean(text), []
        content, calls = self._take_calls(text, final=True)
        return self._fmt.clean(content), calls

    def _take_calls(self, text: str, *, final: bool) -> tuple[str, list[StreamedCall]]:
        """Parse the complete calls at the start of `text`; hold an incomplete one."""
        content, done = "", []
        closer = self._fmt.call_end
        while text.strip():
            end = text.find(closer) if closer else -1
            if end >= 0:
                body, text = text[: end + len(closer)], text[end + len(closer) :]
            elif final:
                body, text = text, ""
            else:
                self._held = text
                break
            _, calls = self._fmt.parse(body)
            if len(calls) == 1:
                streamed = StreamedCall(len(self.calls), call_id(), calls[0])
                self.calls.append(streamed)
                done.append(streamed)
            else:
                content += body  # not a call after all: the client gets the text
        return content, done


def _marker_prefix_length(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `marker`."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
