"""Stand-in token counter for the notes and disclosure modules.

The exact count comes from `instance/context/tokens.py` (the providers' own tokenizers). Until
that module is in this tree, this estimate is used: about 3.5 UTF-8 bytes per token, which is
close for English prose and code on the GLM-4 and Kimi K2 vocabularies and never zero for
non-empty text. Once `tokens.py` exists, this file re-exports its `count_tokens` instead.
"""

from __future__ import annotations

try:  # the real counter, once the phase-1/2 package is merged
    from instance.context.tokens import count_tokens as count_tokens  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on what is merged

    def count_tokens(text: str, model: str | None = None) -> int:
        """Estimated tokens of `text` for `model` (the model is ignored by the estimate)."""
        if not text:
            return 0
        return max(1, round(len(text.encode("utf-8")) / 3.5))
