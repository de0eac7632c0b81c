"""Argument checks that run before a tool spends anything (a provider call, a write).

A call that is going to be refused must be refused first: a 6 MB prompt or a NUL byte found
only when the turn is stored has already cost a provider call and left a thread behind. The
provider's reply is made storable the same way before any turn is written, so a thread never
holds a question without its answer.
"""

from __future__ import annotations

from typing import Any

from common.errors import InvalidArgument
from instance.storage.history import CONTENT_MAX_CHARS
from instance.storage.validation import as_uuid, check_text

PATH_MAX_CHARS = 4096
MAX_FILES = 100
_TRUNCATED = "\n[… answer truncated: it exceeded the storable size …]"


def check_path(raw: Any, what: str = "file path") -> str:
    """A path string the OS can take: text, no NUL byte, bounded length."""
    if not isinstance(raw, str):
        raise InvalidArgument(f"{what} must be a string, got {type(raw).__name__}")
    if "\x00" in raw:
        raise InvalidArgument(f"{what} {raw[:200]!r} contains a NUL character", hint="Pass a real file path.")
    if not raw.strip():
        raise InvalidArgument(f"{what} is empty", hint="Pass absolute file paths.")
    if len(raw) > PATH_MAX_CHARS:
        raise InvalidArgument(f"{what} is {len(raw)} characters long; the limit is {PATH_MAX_CHARS}")
    return raw


def check_chat_arguments(prompt: Any, continuation_id: Any, files: Any) -> None:
    """Everything `chat` can check without I/O, before the provider call and before any write."""
    check_text(prompt, "prompt", min_len=1, max_len=CONTENT_MAX_CHARS)
    if continuation_id is not None:
        as_uuid(continuation_id, "continuation_id")
    if files is not None:
        if not isinstance(files, list):
            raise InvalidArgument("files must be a list of absolute paths")
        if len(files) > MAX_FILES:
            raise InvalidArgument(f"{len(files)} files were given; the limit is {MAX_FILES}")
        for f in files:
            check_path(f)


def storable_reply(text: str) -> str:
    """The provider's answer as it can be stored and returned: NULs replaced, size bounded."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if len(text) > CONTENT_MAX_CHARS:
        text = text[: CONTENT_MAX_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return text
