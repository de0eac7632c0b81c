"""Where a call's context policy comes from: settings, per-model overrides, per-call arguments.

Also the optional model summaries of masked blocks (EXAI_CONTEXT_SUMMARIES, off by default):
each block is summarised once by the model the call uses and cached in Redis by the digest of
its text, so a thread pays for a summary once however often it is compacted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from common.keys import Keys
from common.settings import Settings
from instance.context.builder import ContextPolicy
from instance.context.compaction import digest

if TYPE_CHECKING:
    from instance.providers.models import ModelInfo
    from instance.runtime import Runtime

log = logging.getLogger(__name__)

SUMMARY_TTL_S = 30 * 24 * 3600
SUMMARY_MAX_TOKENS = 160
SUMMARY_PROMPT = (
    "Summarise the following block from an earlier turn of a technical conversation in at most "
    "two sentences. Keep exact names, paths, numbers and error messages. No preamble."
)


def policy_for(
    settings: Settings,
    model: ModelInfo,
    *,
    history_tokens: int | None = None,
    recent_turns: int | None = None,
) -> ContextPolicy:
    """Settings, then the model's overrides, then the call's own arguments (last wins)."""
    over: dict[str, Any] = {}
    for name in (model.name, *model.aliases):
        if name in settings.context_model_overrides:
            over = dict(settings.context_model_overrides[name])
            break
    return ContextPolicy(
        history_share=float(over.get("history_share", settings.context_history_share)),
        recent_turns=int(
            recent_turns
            if recent_turns is not None
            else over.get("recent_turns", settings.context_recent_turns)
        ),
        max_history_tokens=history_tokens,
        output_reserve=min(model.max_output_tokens, 16_384),
        strip=settings.context_strip,
        strip_min_words=settings.context_strip_min_words,
        summaries=settings.context_summaries,
    )


def summarizer_for(runtime: Runtime, provider: Any, model: ModelInfo) -> dict[str, Any]:
    """`build_prompt` keyword arguments for summaries: none unless the setting is on."""
    if not runtime.settings.context_summaries:
        return {}
    from instance.providers import ChatRequest

    keys = Keys(runtime.settings.redis_prefix)

    async def summarize(text: str) -> str:
        key = keys.cache("summary", f"{model.name}:{digest(text)}")
        redis = runtime.redis
        if redis is not None:
            try:
                cached = await redis.get(key)
                if cached:
                    return cached.decode() if isinstance(cached, bytes) else str(cached)
            except Exception as exc:  # a cache outage costs a model call, nothing more
                log.warning("summary cache read failed: %s", exc)
        result = await provider.chat(
            ChatRequest(
                model=model,
                messages=[{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": text}],
                max_tokens=SUMMARY_MAX_TOKENS,
                thinking=False,
                temperature=0.0,
            )
        )
        summary = " ".join(result.content.split())
        if redis is not None and summary:
            try:
                await redis.set(key, summary, ex=SUMMARY_TTL_S)
            except Exception as exc:
                log.warning("summary cache write failed: %s", exc)
        return summary

    return {"summarize": summarize}
