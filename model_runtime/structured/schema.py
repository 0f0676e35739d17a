"""JSON-schema adjustments applied before a schema becomes a grammar."""

from __future__ import annotations

from typing import Any


def close_objects(schema: Any) -> Any:
    """A copy of `schema` in which objects that list their properties and say nothing about
    others allow no others (`additionalProperties: false`), as OpenAI's strict mode requires.

    JSON Schema's default would let the model add keys nobody asked for, which no schema author
    wants from a model, and which a weak model wanders into for as long as max_tokens lasts. An
    object that lists no properties (`{"type": "object"}`), or says otherwise, is left as it is.
    """
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: close_objects(value) for key, value in schema.items()}
    lists_properties = isinstance(schema.get("properties"), dict)
    if lists_properties and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & set(
        schema
    ):
        closed["additionalProperties"] = False
    return closed
