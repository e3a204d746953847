"""Fifty JSON schemas for structured output: objects, arrays, enums, nesting, bounded numbers,
patterns, required and optional properties, const, anyOf, null. Every string is bounded (a
pattern of bounded length, maxLength or an enum) and every array too (maxItems), so the
shortest valid outputs are short and a few dozen tokens finish any of them.

Most strings are ASCII patterns: xgrammar 0.2.9 counts a maxLength string in bytes and lets
control characters and broken UTF-8 into it, which a random-weight model picks (a real model
rarely does); one schema keeps minLength/maxLength."""

from __future__ import annotations

S = {"type": "string", "pattern": "^[A-Za-z0-9 ]{0,8}$"}
I = {"type": "integer", "minimum": 0, "maximum": 99}


def obj(properties: dict, required: list | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **extra}


SCHEMAS: dict[str, dict] = {
    # flat objects
    "one string": obj({"name": S}),
    "one integer": obj({"age": I}),
    "one boolean": obj({"ok": {"type": "boolean"}}),
    "string and integer": obj({"city": S, "population": I}),
    "three fields": obj({"a": S, "b": I, "c": {"type": "boolean"}}),
    "null field": obj({"nothing": {"type": "null"}}),
    "integer range 10-20": obj({"n": {"type": "integer", "minimum": 10, "maximum": 20}}),
    "negative integers": obj({"n": {"type": "integer", "minimum": -50, "maximum": -1}}),
    "exclusive bounds": obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    "number bounded": obj({"x": {"type": "number", "minimum": 0, "maximum": 1}}),
    "number negative range": obj({"t": {"type": "number", "minimum": -10.5, "maximum": -0.5}}),
    "integer single value": obj({"n": {"type": "integer", "minimum": 7, "maximum": 7}}),
    # enums and const
    "string enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "integer enum": obj({"size": {"enum": [1, 2, 4, 8]}}),
    "mixed enum": obj({"v": {"enum": ["a", 1, True, None]}}),
    "const": obj({"kind": {"const": "point"}, "x": I}),
    "enum at top level": {"enum": ["yes", "no", "maybe"]},
    "two enums": obj({"answer": {"enum": ["yes", "no"]}, "confidence": {"enum": ["low", "high"]}}),
    # patterns and string lengths
    "pattern digits": obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "pattern code": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    "pattern date": obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    "string min length": obj({"word": {"type": "string", "minLength": 3, "maxLength": 6}}),
    "pattern lowercase": obj({"slug": {"type": "string", "pattern": "^[a-z]{1,6}$"}}),
    "pattern alternatives": obj({"unit": {"type": "string", "pattern": "^(kg|g|mg)$"}}),
    # optional properties
    "optional only": obj({"a": S, "b": I}, required=[]),
    "one required one optional": obj({"id": I, "note": S}, required=["id"]),
    "optional nested": obj({"id": I, "meta": obj({"tag": S})}, required=["id"]),
    "no additional properties": obj({"x": I, "y": I}, additionalProperties=False),
    "empty object": {"type": "object", "properties": {}, "additionalProperties": False},
    # arrays
    "array of integers": {"type": "array", "items": I, "maxItems": 3},
    "array of strings": {"type": "array", "items": S, "minItems": 1, "maxItems": 3},
    "array with min items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "array of enums": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 4},
    "object with array": obj({"tags": {"type": "array", "items": S, "maxItems": 2}}),
    "array of objects": {"type": "array", "items": obj({"k": S}), "maxItems": 2},
    "tuple": {"type": "array", "prefixItems": [I, S], "items": False},
    "fixed length array": {"type": "array", "items": I, "minItems": 2, "maxItems": 2},
    # nesting
    "nested object": obj({"person": obj({"name": S, "age": I})}),
    "two levels": obj({"a": obj({"b": obj({"c": I})})}),
    "nested array": obj({"matrix": {"type": "array", "items": {"type": "array", "items": I, "maxItems": 2},
                                    "maxItems": 2}}),
    "address": obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{4}$"}}),
    "order": obj({"item": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                  "express": {"type": "boolean"}}),
    "event": obj({"title": S, "when": obj({"day": {"type": "integer", "minimum": 1, "maximum": 28},
                                           "month": {"enum": ["jan", "feb", "mar"]}})}),
    "nested with optional": obj({"user": obj({"id": I, "email": S}, required=["id"])}),
    # combinators and nullability
    "anyOf types": obj({"v": {"anyOf": [I, {"type": "boolean"}]}}),
    "nullable string": obj({"nick": {"anyOf": [S, {"type": "null"}]}}),
    "type list": obj({"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    "oneOf objects": {"anyOf": [obj({"cat": S}), obj({"dog": I})]},
    "ref definitions": {"$defs": {"point": obj({"x": I, "y": I})}, "type": "object",
                        "properties": {"a": {"$ref": "#/$defs/point"}}, "required": ["a"]},
    "boolean top level": {"type": "boolean"},
    "integer top level": {"type": "integer", "minimum": 1, "maximum": 5},
}
