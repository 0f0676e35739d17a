"""Structured output: grammars that constrain decoding (JSON schemas, tool calls), built on llguidance.

Why llguidance (over xgrammar, the other maintained choice): grammars are compiled lazily, so a new
schema costs microseconds to milliseconds rather than an ahead-of-time compile per schema; its JSON
Schema support reports unsupported keywords by name (our 400s quote it); Lark grammars can embed
JSON schemas (`%json{...}`) and special tokens, which is exactly what a tool call in Qwen's or
InternLM2's format is; and its executor computes a batch's masks on its own threads without the
GIL. Every limit (lexer fuel, Earley items, grammar size) is bounded per grammar and per step.
"""
