"""Request-level constraints compiled to llguidance grammars, validated once and cached.

A `Constraint` is checked against the served tokenizer before the request reaches the engine: a
schema llguidance cannot honour (an unknown `format`, an unimplemented keyword in strict mode, a
grammar over its size or lexer limits) is a 400 that quotes the reason, never a silent fallback.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from model_runtime.errors import InvalidRequestError
from model_runtime.structured.schema import close_objects

# JSON as json.dumps writes it by default, which is what the models were trained to emit: one
# space after ',' and ':', no other whitespace (free whitespace lets a weak model wander in it).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_ERROR_CHARS = 400
# llguidance's defaults, but errors never quote the parser's internal state (it may be large).
LIMITS = LLParserLimits(verbose_errors=False)


@dataclass(frozen=True)
class Constraint:
    """A validated grammar the output must match; `kind` names it in logs and metrics."""

    grammar: str
    kind: str

    def matcher(self, tokenizer: LLTokenizer) -> LLMatcher:
        return LLMatcher(tokenizer, self.grammar, log_level=0, limits=LIMITS)


class GrammarCompiler:
    """Builds and validates constraints for one tokenizer; an LRU cache keyed by the source."""

    def __init__(self, tokenizer: LLTokenizer, cache_size: int = 512) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[tuple[str, str], Constraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # processor threads share the cache

    def json_object(self) -> Constraint:
        return self._get(
            "json_object",
            "",
            lambda: LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS),
            "response_format",
        )

    def json_schema(self, schema: dict[str, Any], *, strict: bool, param: str) -> Constraint:
        """`strict`: every keyword must be honoured (an unsupported one is a 400); otherwise
        keywords llguidance does not implement are ignored and the rest enforced."""
        source = json.dumps(close_objects(schema), sort_keys=True)
        options = {**JSON_OPTIONS, "lenient": not strict}
        return self._get(
            "json_schema" if strict else "json_schema_lenient",
            source,
            lambda: LLMatcher.grammar_from_json_schema(source, options),
            param,
        )

    def lark(self, text: str, *, kind: str, param: str) -> Constraint:
        return self._get(kind, text, lambda: LLMatcher.grammar_from_lark(text), param)

    def _get(self, kind: str, source: str, build: Callable[[], str], param: str) -> Constraint:
        key = (kind, source)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            grammar = build()
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"invalid {param}: {_short(str(exc))}", param=param) from None
        error = LLMatcher.validate_grammar(grammar, self.tokenizer, limits=LIMITS)
        if error:
            raise InvalidRequestError(f"unsupported {param}: {_short(error)}", param=param)
        constraint = Constraint(grammar, kind)
        with self._lock:
            self._cache[key] = constraint
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return constraint


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 1] + "…"
