"""What every webhook route shares: a refusal with an HTTP status, a body read with a size bound, and the
decoding of a body into a JSON object that can never raise anything but a :class:`Reject`."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from kiln.infra.http_body import read_limited


class Reject(Exception):
    """An answer other than "started": a status and a message for the sender and the operator's log."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Any, limit: int) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed ``limit`` (from Content-Length or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise Reject(400, f"Content-Length {declared[:40]!r} is not a number")

    def refuse(size: int | None) -> Reject:
        body = f"body of {size} bytes exceeds" if size is not None else "body exceeds"
        return Reject(413, f"{body} the limit of {limit} bytes (KILN_WEBHOOK_MAX_BODY)")

    return await read_limited(request, limit, refuse)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes, content_type: str) -> dict[str, Any]:
    """The payload as a dict, or 400 (415 for another content type): GitHub's form encoding (exactly one
    ``payload=<json>`` field) is accepted too.

    Refused with 400, never a 500: bytes that are not UTF-8, NaN/Infinity (not JSON), nesting deeper than the
    parser's recursion limit, a form body without exactly one ``payload`` field, anything but an object.
    """
    text: str | bytes = body
    media = content_type.split(";")[0].strip().lower()
    if media not in ("", "application/json", "application/x-www-form-urlencoded"):
        raise Reject(415, f"Content-Type {media[:60]!r} is not application/json; set the webhook's content type "
                          "to application/json")
    if media == "application/x-www-form-urlencoded":
        try:
            fields = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
                              errors="strict", max_num_fields=16)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Reject(400, "form body is not URL-encoded UTF-8; send payload=<JSON> or use "
                              "Content-Type: application/json") from exc
        values = fields.get("payload", [])
        if len(values) != 1 or set(fields) != {"payload"}:
            raise Reject(400, "a form-encoded body must hold exactly one field, payload=<JSON>; "
                              "or set the webhook's content type to application/json")
        text = values[0]
    try:
        payload = json.loads(text, parse_constant=_no_constant)
    except RecursionError as exc:
        raise Reject(400, "body is not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and NaN/Infinity are all ValueErrors
        raise Reject(400, f"body is not valid JSON ({str(exc)[:120]})") from exc
    if not isinstance(payload, dict):
        raise Reject(400, "body must be a JSON object")
    return payload


def field(payload: dict[str, Any], *path: str) -> Any:
    """``payload[path[0]][path[1]]...``, or 400 naming the dotted path when a level is missing or not an object."""
    value: Any = payload
    for key in path:
        if not isinstance(value, dict) or value.get(key) in (None, ""):
            raise Reject(400, f"push payload has no {'.'.join(path)}")
        value = value[key]
    return value


def text(value: Any, name: str, *, limit: int = 1024) -> str:
    """``value`` when it is a printable string of at most ``limit`` characters (no control characters or lone
    surrogates, which could not be logged or answered as UTF-8), else 400 naming the field."""
    if not isinstance(value, str):
        raise Reject(400, f"push payload's {name} must be a string, not {type(value).__name__}")
    if len(value) > limit or not value.isprintable():
        raise Reject(400, f"push payload's {name} must be printable text of at most {limit} characters")
    return value


def optional_text(payload: dict[str, Any], name: str, key: str) -> str | None:
    """``payload[key]`` as :func:`text` when present and not null/empty; ``payload`` must be an object."""
    if not isinstance(payload, dict) or payload.get(key) in (None, ""):
        return None
    return text(payload[key], f"{name}.{key}")
