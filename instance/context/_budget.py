"""Token counts for the notes and disclosure modules, through one function: `count_tokens`.

The exact counts belong to `instance/context/tokens.py` (phases 1-2: the providers' own
vocabularies from the `splintr-rs` wheel, cached). This module is a stand-in until that
module is in the tree, and a shim after: it uses, in order,

1. `instance.context.tokens.counter_for(model).count(text)` when that module exists;
2. the `splintr` tokenizers directly when the package is installed (GLM-4 or Kimi K2
   vocabulary by model name), so counts are exact without phases 1-2;
3. an estimate of 3.5 UTF-8 bytes per token (a little high for code, close for prose).

Everything in notes_block, disclosure and the benchmark counts through here, so the swap is
this one file.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

DEFAULT_MODEL = "glm-4.6"


def _estimate(text: str, model: str | None = None) -> int:
    return max(1, round(len(text.encode("utf-8")) / 3.5)) if text else 0


@functools.cache
def _splintr(vocabulary: str) -> Any:
    from splintr import Tokenizer  # type: ignore[import-not-found,unused-ignore]

    return Tokenizer.from_pretrained(vocabulary)


def _resolve() -> tuple[str, Callable[[str, str | None], int]]:
    try:
        from instance.context.tokens import counter_for  # type: ignore[import-not-found,unused-ignore]

        def via_tokens(text: str, model: str | None = None) -> int:
            return int(counter_for(model or DEFAULT_MODEL).count(text)) if text else 0

        return "instance.context.tokens", via_tokens
    except ImportError:
        pass
    if importlib.util.find_spec("splintr") is not None:  # vocabularies load on first use

        def via_splintr(text: str, model: str | None = None) -> int:
            kimi = (model or "").lower().startswith(("kimi", "moonshot"))
            return len(_splintr("kimi_k2" if kimi else "glm4").encode_ordinary(text)) if text else 0

        return "splintr", via_splintr
    return "estimate (3.5 bytes/token)", _estimate


COUNTER, _count = _resolve()
"""Which counter is in use, for reports and benchmarks."""


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens of `text` as `model` (default GLM) would count it."""
    return _count(text, model)
