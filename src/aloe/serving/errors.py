"""Request errors shared by ``aloe serve`` and ``aloe proxy``: one line, never a traceback."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError


def validation_message(exc: RequestValidationError) -> str:
    """The first problem of a request that did not parse, as one line: ``field: reason``."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        where, msg = "", "the body is not valid JSON"
    elif tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        where, msg = "", "the body must be a JSON object (content-type: application/json)"
    return f"{where}: {msg}" if where else msg
