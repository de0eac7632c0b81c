"""The one place a prompt is assembled: thread + new prompt + budget -> messages to send.

    built = await build_prompt(turns, prompt, model=info, system=SYSTEM_PROMPT,
                               extras=[Block("files", text)], policy=policy)
    result = await provider.chat(ChatRequest(model=info, messages=built.messages, ...))
    await history.append(cid, "user", built.user_content, metadata=built.user_metadata)

Order of work: (1) strip echoes of stored turns from the new prompt (phase 1, `stripping`);
(2) count everything in the model's own tokens (`tokens`); (3) give history what the budget
leaves after the system prompt, the extra blocks and the new turn, capped at the policy's
share, and compact it (phase 2, `compaction`); (4) lay out the messages: system, history
(verbatim or compacted), then the new user turn with its extra blocks.

Extension points: `extras` are blocks a tool adds around the user's turn (files today; notes,
disclosed file ranges and link-group context later). Each `Block` says where it goes
(`placement="system"` appends to the system message, `"user"` to the new user turn) and
whether it is stored with the turn (`stored`): files are sent once and not stored, so they
never come back from history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from instance.context.compaction import Compacted, HistoryTurn, compact
from instance.context.stripping import DEFAULT_MIN_WORDS, StoredTurn, StripResult, strip_echoes, view_cached
from instance.context.tokens import OFFLOAD_CHARS, TokenCounter, counter_for

Summarize = Callable[[str], Awaitable[str]]
"""Async: the text of a masked block -> a short summary (a model call, cached by the caller)."""


@dataclass(frozen=True)
class Block:
    """An extra piece of context a tool adds (files, notes, group context ...)."""

    name: str
    text: str
    placement: Literal["system", "user"] = "user"
    stored: bool = False


@dataclass(frozen=True)
class ContextPolicy:
    """How much of the window history may take, and how it is kept; from settings or per call."""

    history_share: float = 0.5
    recent_turns: int = 4
    max_history_tokens: int | None = None
    output_reserve: int = 16_384
    strip: bool = True
    strip_min_words: int = DEFAULT_MIN_WORDS
    summaries: bool = False


class Turn(NamedTuple):
    """A stored turn handed to the builder (role, content, and its id for stripping records).

    A named tuple, not a frozen dataclass: one is made per stored turn on every call, and a
    frozen dataclass's __init__ costs three times as much.
    """

    id: str
    role: str
    content: str


@dataclass
class BuiltPrompt:
    messages: list[dict[str, str]]
    user_content: str  # what to store as the new user turn (echoes stripped)
    user_metadata: dict[str, Any]  # audit record of the stripping, stored with the turn
    strip: StripResult
    history: Compacted
    tokens_sent: int
    history_budget: int
    blocks: dict[str, int] = field(default_factory=dict)  # tokens per extra block

    def report(self) -> dict[str, Any]:
        """What the tool result says about the prompt it sent."""
        return {
            "tokens_sent": self.tokens_sent,
            "history_budget": self.history_budget,
            "stripped": self.strip.report(),
            "history": self.history.report(),
            "blocks": dict(self.blocks),
        }


def _family_of(model: Any) -> TokenCounter:
    if isinstance(model, str):
        return counter_for(model)
    return counter_for(getattr(model, "name", "glm"), getattr(model, "provider", None))


async def build_prompt(
    thread: Sequence[Turn],
    new_prompt: str,
    model: Any,
    *,
    system: str,
    policy: ContextPolicy | None = None,
    context_window: int | None = None,
    extras: Sequence[Block] = (),
    summarize: Summarize | None = None,
    summary_cache: Mapping[str, str] | None = None,
) -> BuiltPrompt:
    """Messages for one call; `model` is a `ModelInfo` (or a model name)."""
    policy = policy or ContextPolicy()
    counter = _family_of(model)
    window: int = (
        context_window if context_window is not None else int(getattr(model, "context_window", 128_000))
    )
    hist = [t for t in thread if t.role in ("user", "assistant", "system")]  # as chat always sent

    # (1) phase 1: strip echoes of stored turns (pure CPU on possibly large text: off the loop)
    stored = [StoredTurn(t.id, i + 1, t.role, t.content) for i, t in enumerate(hist)]
    # A small prompt is built on the loop: a worker-thread hop costs more than the work. So is a
    # big thread whose turns were seen before (the next call on it): their words, shingles and
    # token counts are cached, and only the new prompt is work.
    small = len(new_prompt) + sum(len(t.content) for t in hist) <= OFFLOAD_CHARS
    if policy.strip and stored:
        if (
            small
            or len(new_prompt) + sum(len(t.content) for t in hist if not view_cached(t.content))
            <= OFFLOAD_CHARS
        ):
            strip = strip_echoes(new_prompt, stored, min_words=policy.strip_min_words, count=counter.count)
        else:
            strip = await asyncio.to_thread(
                strip_echoes, new_prompt, stored, min_words=policy.strip_min_words, count=counter.count
            )
    else:
        n = await counter.acount(new_prompt)
        strip = StripResult(new_prompt, new_prompt, (), n, n)

    # (2)-(3) budget for history in this model's tokens
    system_text = "\n\n".join([system, *(b.text for b in extras if b.placement == "system")])
    user_text = "\n\n".join([strip.text, *(b.text for b in extras if b.placement == "user")])
    blocks = {b.name: await counter.acount(b.text) for b in extras}
    fixed = counter.fixed + counter.message("system", system_text) + counter.message("user", user_text)
    available = max(0, window - min(policy.output_reserve, window // 4) - fixed)
    budget = int(min(available, policy.history_share * window))
    if policy.max_history_tokens is not None:
        budget = min(budget, policy.max_history_tokens)

    turns = [HistoryTurn(t.id, i + 1, t.role, t.content) for i, t in enumerate(hist)]

    def run(summaries: Mapping[str, str] | None) -> Compacted:
        return compact(
            turns,
            budget,
            counter.count,
            counter.framing,
            recent_turns=policy.recent_turns,
            focus=strip.text,
            summaries=summaries,
        )

    # Verbatim history (it fits) of counted turns is a sum of cached counts; compacting is not.
    on_loop = small or (
        all(counter.cached(t.content) for t in turns)
        and sum(counter.framing(t.role) + counter.count(t.content) for t in turns) <= budget
    )
    history = run(summary_cache) if on_loop else await asyncio.to_thread(run, summary_cache)
    if policy.summaries and summarize is not None and history.masked:
        found = dict(summary_cache or {})
        missing = [(d, text) for d, text in history.masked if d not in found]
        results = await asyncio.gather(*(summarize(text) for _, text in missing), return_exceptions=True)
        for (d, _), res in zip(missing, results, strict=True):
            if isinstance(res, str) and res.strip():
                found[d] = " ".join(res.split())
        history = await asyncio.to_thread(run, found)

    messages = [
        {"role": "system", "content": system_text},
        *history.messages,
        {"role": "user", "content": user_text},
    ]
    # What count_messages(messages) would find, without counting every message again: `fixed`
    # holds the request's framing, the system and the user message, and compaction's
    # `tokens_after` is the same framing-plus-content sum over exactly the history it returns.
    sent = fixed + history.tokens_after
    stored_extra = [b.text for b in extras if b.stored]
    user_content = "\n\n".join([strip.text, *stored_extra]) if stored_extra else strip.text
    user_metadata: dict[str, Any] = {}
    if strip.strips:
        user_metadata["stripped"] = {
            "tokens": strip.tokens_stripped,
            "tokens_original": strip.tokens_before,
            "cuts": [s.to_dict() for s in strip.strips],
        }
    user_metadata["tokens"] = await counter.acount(user_content)
    return BuiltPrompt(
        messages=messages,
        user_content=user_content,
        user_metadata=user_metadata,
        strip=strip,
        history=history,
        tokens_sent=sent,
        history_budget=budget,
        blocks=blocks,
    )
