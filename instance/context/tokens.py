"""Exact token counts for GLM and Kimi, offline, with each model's own vocabulary.

The vocabularies come from the `splintr-rs` wheel (GLM-4/4.5/4.6 share `glm4`; every Kimi K2
model uses `kimi_k2`), so counting needs no network and no download at run time. A chat
request is billed for its content plus the chat template's framing around each message;
`count_messages` adds that framing as each model's template lays it out:

    GLM   [gMASK]<sop><|system|>\\n{system}<|user|>\\n{user}<|assistant|>
    Kimi  <|im_system|>system<|im_middle|>{system}<|im_end|><|im_user|>user<|im_middle|>...
          <|im_assistant|>assistant<|im_middle|>

Content is encoded with `encode_ordinary`, so a message that spells a control token is
counted as the text it is. Counting a big text (a pasted log, a file) takes milliseconds, so
`acount` moves texts above `OFFLOAD_CHARS` to a worker thread; an LRU cache keyed by the text
itself makes re-counting a thread's stored turns free (a string caches its hash, so the turn's
other look-ups in the same call, stripping's and the request body's, hash it once in all).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

Family = Literal["glm", "kimi"]

OFFLOAD_CHARS = 16_384
"""Texts longer than this are encoded in a worker thread by `acount` (about 1 ms of CPU)."""

CACHE_ENTRIES = 4096
CACHE_CHARS = 1_000_000
"""Characters of the texts the cache keeps alive as its keys (1-4 MB: a 20-turn thread of 25k
characters a turn fits twice)."""
_CACHE_MIN_CHARS = 64  # shorter texts are cheaper to encode than to hash and look up
_KEY_MAX_CHARS = 64_000  # longer texts are keyed by a digest: they would crowd the others out


@dataclass(frozen=True)
class _Template:
    vocabulary: str
    prefix: str  # once per request
    role_open: Mapping[str, str]
    close: str  # after each message
    generation: str  # the assistant header the server appends


_TEMPLATES: dict[Family, _Template] = {
    "glm": _Template(
        vocabulary="glm4",
        prefix="[gMASK]<sop>",
        role_open={
            "system": "<|system|>\n",
            "user": "<|user|>\n",
            "assistant": "<|assistant|>\n",
            "tool": "<|observation|>\n",
        },
        close="",
        generation="<|assistant|>",
    ),
    "kimi": _Template(
        vocabulary="kimi_k2",
        prefix="",
        role_open={
            "system": "<|im_system|>system<|im_middle|>",
            "user": "<|im_user|>user<|im_middle|>",
            "assistant": "<|im_assistant|>assistant<|im_middle|>",
            "tool": "<|im_system|>tool<|im_middle|>",
        },
        close="<|im_end|>",
        generation="<|im_assistant|>assistant<|im_middle|>",
    ),
}


def family_of(model: str, provider: str | None = None) -> Family:
    """The tokenizer family of a model name (provider wins when given: passthrough names)."""
    if provider in ("glm", "kimi"):
        return provider  # type: ignore[return-value]
    name = model.strip().lower()
    return "kimi" if name.startswith(("kimi", "moonshot")) else "glm"


@cache
def _tokenizer(vocabulary: str) -> Any:
    from splintr import Tokenizer

    return Tokenizer.from_pretrained(vocabulary)


class TokenCounter:
    """Counts tokens of one model family; thread-safe, shared by every call of an instance."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self._template = _TEMPLATES[family]
        self._tok = _tokenizer(self._template.vocabulary)
        self._cache: OrderedDict[str | bytes, int] = OrderedDict()
        self._cache_chars = 0
        self._lock = threading.Lock()
        self._framing = {role: self._special(opener) + self._special(self._template.close)
                         for role, opener in self._template.role_open.items()}  # fmt: skip
        self._fixed = self._special(self._template.prefix) + self._special(self._template.generation)

    def _special(self, text: str) -> int:
        return len(self._tok.encode_with_special(text)) if text else 0

    def warm(self) -> None:
        """Run the encoder once over WARM_TEXT (blocking, up to half a second the first time)."""
        self._tok.encode_ordinary(WARM_TEXT)

    def count(self, text: str) -> int:
        """Tokens of `text` as message content (control-token spellings count as plain text)."""
        if not text:
            return 0
        if len(text) < _CACHE_MIN_CHARS:
            return len(self._tok.encode_ordinary(text))
        key = _key(text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        n = len(self._tok.encode_ordinary(text))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = n
                self._cache_chars += len(key) if isinstance(key, str) else 0
                while len(self._cache) > CACHE_ENTRIES or self._cache_chars > CACHE_CHARS:
                    old, _ = self._cache.popitem(last=False)
                    self._cache_chars -= len(old) if isinstance(old, str) else 0
        return n

    def cached(self, text: str) -> bool:
        """Whether counting `text` is a look-up (or too short to matter): no encoding to do."""
        if len(text) < _CACHE_MIN_CHARS:
            return True
        key = _key(text)
        with self._lock:
            return key in self._cache

    async def acount(self, text: str) -> int:
        """`count` that keeps the event loop free for big texts."""
        if len(text) > OFFLOAD_CHARS:
            return await asyncio.to_thread(self.count, text)
        return self.count(text)

    def framing(self, role: str) -> int:
        """Template tokens around one message of `role`."""
        return self._framing.get(role, self._framing["user"])

    @property
    def fixed(self) -> int:
        """Template tokens once per request (prefix and the generation header)."""
        return self._fixed

    def message(self, role: str, content: str) -> int:
        return self.framing(role) + self.count(content)

    def count_messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Prompt tokens a provider bills for these chat messages (no tools, text content)."""
        return self._fixed + sum(self.message(str(m["role"]), str(m.get("content") or "")) for m in messages)

    async def acount_messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        msgs = list(messages)
        if sum(len(str(m.get("content") or "")) for m in msgs) > OFFLOAD_CHARS:
            return await asyncio.to_thread(self.count_messages, msgs)
        return self.count_messages(msgs)


def _key(text: str) -> str | bytes:
    if len(text) <= _KEY_MAX_CHARS:
        return text
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


_COUNTERS: dict[Family, TokenCounter] = {}
_COUNTERS_LOCK = threading.Lock()


def counter_for(model: str, provider: str | None = None) -> TokenCounter:
    """The shared counter of a model's family (vocabulary loaded once per process)."""
    family = family_of(model, provider)
    with _COUNTERS_LOCK:
        found = _COUNTERS.get(family)
        if found is None:
            found = _COUNTERS[family] = TokenCounter(family)
        return found


def ready(model: str, provider: str | None = None) -> bool:
    """Whether the model family's vocabulary is loaded (counting will not load it now)."""
    return family_of(model, provider) in _COUNTERS


WARM_TEXT = "q 7 chat-normal-1-0 ffee01: x ffee01, def f(a=1): return a  # 你好 émoji 🙂 <|user|>"
"""Encoded once per vocabulary by `preload`: the tokenizer builds part of its matcher lazily,
on the first text with a mix like "x ffee01", and that first encode takes 0.1-0.5 s of CPU
(measured with splintr-rs 0.22; later ones take microseconds). Paid at start-up on a
worker thread instead of on the event loop inside an instance's first call."""


def preload(families: Iterable[Family] = ("glm", "kimi")) -> None:
    """Load vocabularies up front and warm their encoders (blocking: call it off the event
    loop, at startup)."""
    for family in families:
        counter_for(family).warm()


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens of `text` as content in `model`'s vocabulary (GLM-4 when no model is named)."""
    return counter_for(model or "glm-4.6").count(text)
