"""Argument checks shared by the stores, so bad input fails before anything is written."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from common.errors import InvalidArgument

METADATA_MAX_BYTES = 64 * 1024


def as_uuid(value: Any, what: str) -> str:
    """The canonical text form of a UUID argument, or InvalidArgument naming the argument."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a UUID string, got {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{what} is not a valid UUID: {value[:80]!r}") from None


def new_id() -> str:
    return str(uuid.uuid4())


METADATA_MAX_DEPTH = 32


def _check_json(value: Any, path: str, depth: int = 0) -> None:
    if depth > METADATA_MAX_DEPTH:
        raise InvalidArgument(
            f"metadata is nested deeper than {METADATA_MAX_DEPTH} levels (at metadata{path[:100]})"
        )
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidArgument(
                f"metadata{path[:100]} contains a NUL character, which Postgres cannot store"
            )
        return
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"metadata{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise InvalidArgument(
                    f"metadata{path} has a non-string key {k!r}; JSON object keys are strings"
                )
            if "\x00" in k:
                raise InvalidArgument(f"metadata{path[:100]} has a key with a NUL character")
            _check_json(item, f"{path}.{k}", depth + 1)
        return
    raise InvalidArgument(
        f"metadata{path} is a {type(value).__name__}, which is not JSON (use str, number, list, dict)"
    )


def check_metadata(value: Any, *, max_bytes: int = METADATA_MAX_BYTES) -> dict[str, Any]:
    """A JSON object of bounded size; anything else is InvalidArgument."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"metadata must be a JSON object (dict), got {type(value).__name__}")
    _check_json(value, "")
    size = len(json.dumps(value, ensure_ascii=False).encode())
    if size > max_bytes:
        raise InvalidArgument(f"metadata is {size} bytes; the limit is {max_bytes} bytes")
    return value


def check_text(value: Any, what: str, *, min_len: int = 0, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character, which Postgres text cannot store")
    if len(value) < min_len:
        raise InvalidArgument(f"{what} must not be empty" if min_len == 1 else f"{what} is too short")
    if max_len is not None and len(value) > max_len:
        raise InvalidArgument(f"{what} is {len(value)} characters; the limit is {max_len}")
    return value


def check_optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**31 - 1:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {value!r}")
    return value
