"""Structured output from a request: ``response_format`` (OpenAI), ``structured_outputs`` and the
older ``guided_*`` fields (vLLM), as one ``StructuredOutputsParams``, checked here so an invalid
schema, regex or grammar is a 400 naming its field and the problem before the engine sees it."""

from __future__ import annotations

import json
from typing import Callable, Optional

from runtime.sample.params import StructuredOutputsParams
from runtime.structured.grammar import check

from .errors import bad_request
from .protocol import ResponseFormat, SamplingFields, StructuredOutputsRequest

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(req: SamplingFields) -> Optional[StructuredOutputsParams]:
    """The request's constraint, or None; a 400 when it sets several or one is invalid."""
    given: list[tuple[str, Callable[[], StructuredOutputsParams]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        given.append(("response_format", lambda: _response_format(fmt)))
    if req.structured_outputs is not None:
        given.append(("structured_outputs", lambda: _structured_outputs(req.structured_outputs)))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            given.append((name, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})))
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"set one structured output field, got {' and '.join(name for name, _ in given)}", given[1][0])
    param, build = given[0]
    try:
        params = build()
        check(params)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
    return params


def _structured_outputs(fields: StructuredOutputsRequest) -> StructuredOutputsParams:
    values = fields.model_dump(exclude={"disable_fallback"})
    values["json"] = values.pop("json_")
    if isinstance(values["structural_tag"], dict):
        values["structural_tag"] = json.dumps(values["structural_tag"])
    return StructuredOutputsParams(**values)


def _response_format(fmt: ResponseFormat) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.type == "json_schema":
        schema = fmt.json_schema.json_schema
        return StructuredOutputsParams(json=schema) if schema is not None else StructuredOutputsParams(json_object=True)
    if fmt.format is not None:
        tag = {"type": "structural_tag", "format": fmt.format}
    else:
        tag = {"type": "structural_tag", "structures": fmt.structures or [], "triggers": fmt.triggers or []}
    return StructuredOutputsParams(structural_tag=json.dumps(tag))
