"""The context package without services: token counts, stripping and compaction rules."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from instance.context import stripping
from instance.context.compaction import ELISION, HistoryTurn, compact
from instance.context.stripping import StoredTurn, strip_echoes, unstrip
from instance.context.tokens import OFFLOAD_CHARS, counter_for
from tests.bench.context_corpus import make_thread

RECORDED = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Say hi in Portuguese"},
]


def test_counts_match_recorded_provider_usage() -> None:
    # prompt_tokens reported for exactly these messages by recorded real responses:
    # Kimi K2 (moonshotai/kimi-k2-instruct-0905) 20, GLM-4.6V 16.
    assert counter_for("kimi-k2-0905-preview").count_messages(RECORDED) == 20
    assert counter_for("glm-4.6").count_messages(RECORDED) == 16


def test_control_token_spellings_count_as_text() -> None:
    glm = counter_for("glm-4.6")
    assert glm.count("<|user|>") > 1
    assert glm.count("") == 0


async def test_big_texts_are_counted_off_the_loop_with_the_same_result() -> None:
    kimi = counter_for("kimi")
    text = "def handler(request):\n    return 42  # 答案\n" * (OFFLOAD_CHARS // 20)
    assert await kimi.acount(text) == kimi.count(text) > 1000
    assert await asyncio.gather(kimi.acount(text), kimi.acount(text)) == [kimi.count(text)] * 2


def test_unstrip_restores_the_referred_text() -> None:
    t1 = " ".join(f"word{i}" for i in range(40)) + "."
    turns = [StoredTurn("a", 1, "user", t1)]
    res = strip_echoes(f"Before that, you wrote: {t1} What next?", turns)
    assert res.text == "Before that, you wrote: [repeats turn 1] What next?"
    assert unstrip(res.text, res.strips, turns) == f"Before that, you wrote: {t1} What next?"


def test_a_thread_stripped_again_gives_the_same_cuts() -> None:
    """Stored turns are tokenised once and reused: a call on a grown thread, some of its turns
    already seen and some not, cuts exactly what a first call on a fresh process would."""
    t1 = " ".join(f"alpha{i}" for i in range(50)) + "."
    t2 = " ".join(f"beta{i}" for i in range(30)) + " " + " ".join(f"alpha{i}" for i in range(10, 40))
    t3 = " ".join(f"gamma{i}" for i in range(45))
    prompt = f"You said: {t2} and then: {t3} So what now?"
    short = [StoredTurn("a", 1, "user", t1), StoredTurn("b", 2, "assistant", t2)]
    grown = [*short, StoredTurn("c", 3, "user", t3)]
    first = strip_echoes(prompt, short)
    assert strip_echoes(prompt, short) == first and first.strips
    warm = strip_echoes(prompt, grown)
    stripping._turn_cache.clear()  # a fresh process: nothing seen yet
    cold = strip_echoes(prompt, grown)
    assert warm == cold and {i for s in cold.strips for i in s.turn_ids} == {"b", "c"}


def test_short_quotes_are_never_stripped() -> None:
    t1 = " ".join(f"w{i}" for i in range(60))
    quote = " ".join(f"w{i}" for i in range(10, 29))  # 19 words, under the 20-word threshold
    res = strip_echoes(f"About '{quote}' — why?", [StoredTurn("a", 1, "assistant", t1)])
    assert not res.strips and res.text == f"About '{quote}' — why?"


def test_compaction_is_deterministic_and_never_cuts_a_sentence() -> None:
    th = make_thread(4242)
    turns = [HistoryTurn(str(i), i + 1, t["role"], t["content"]) for i, t in enumerate(th.turns)]
    c = counter_for("glm-4.6")
    full = sum(c.framing(t.role) + c.count(t.content) for t in turns)
    a = compact(turns, full // 4, c.count, c.framing, recent_turns=4)
    b = compact(list(turns), full // 4, c.count, c.framing, recent_turns=4)
    assert a.messages == b.messages and a.compacted
    assert a.tokens_after <= full // 4 + c.framing("user")
    original = "\n".join(t.content for t in turns)
    for seg in _kept_segments(a.messages[0]["content"]):
        assert seg in original, seg
        end = original.index(seg) + len(seg)
        assert seg[-1] in ".!?:`" or end == len(original) or original[end] in "\n", (
            f"cut mid-sentence: {seg!r}"
        )


def _kept_segments(text: str) -> list[str]:
    import re

    text = re.sub(r"^--- turn \d+ \(\w+\) ---$", "\n", text, flags=re.M)
    text = re.sub(
        r"\[masked [^\n]*\]|\[turns? [\d-]+ omitted: \d+ tokens\]|\[Earlier turns[^\]]*\]", "\n", text
    )
    out: list[str] = []
    for chunk in text.split(ELISION):
        for line in chunk.split("\n"):
            if line.strip():
                out.append(line.strip())
    return out


def test_a_budget_too_small_for_any_history_sends_none_and_says_so() -> None:
    th = make_thread(1, turns=10)
    turns = [HistoryTurn(str(i), i + 1, t["role"], t["content"]) for i, t in enumerate(th.turns)]
    c = counter_for("kimi-k2")
    out = compact(turns, 0, c.count, c.framing, recent_turns=4)
    assert out.messages == [] and out.turns_omitted == 10 and out.tokens_after == 0


def test_compacted_prefix_stays_the_same_while_the_thread_grows() -> None:
    """Stable mode: the boundary moves in steps, so consecutive calls share the compacted text."""
    th = make_thread(8, turns=40)
    turns = [HistoryTurn(str(i), i + 1, t["role"], t["content"]) for i, t in enumerate(th.turns)]
    c = counter_for("glm-4.6")
    budget = int(0.6 * sum(c.framing(t.role) + c.count(t.content) for t in turns[:30]))
    runs = [compact(turns[:n], budget, c.count, c.framing, recent_turns=4) for n in range(28, 41, 2)]
    assert all(r.compacted and r.tokens_after <= budget for r in runs)
    reused = sum(a.messages[0] == b.messages[0] for a, b in itertools.pairwise(runs))
    assert reused >= 4, reused  # 6 transitions, the boundary moved twice
    for a, b in itertools.pairwise(runs):
        if a.messages[0] == b.messages[0]:  # then the whole earlier prompt is a prefix of the next
            assert b.messages[: len(a.messages)] == a.messages


async def test_tokens_sent_is_what_the_messages_count_whether_compacted_or_not() -> None:
    """build_prompt adds up tokens_sent from the parts it counted; it must equal a recount of
    the messages it returns, verbatim history or compacted, with extra blocks in both places."""
    from instance.context import Block, Turn, build_prompt
    from instance.context.builder import ContextPolicy

    th = make_thread(77)
    turns = [Turn(str(i), t["role"], t["content"]) for i, t in enumerate(th.turns)]
    extras = [Block("notes", "remember the decision"), Block("sys", "be brief", placement="system")]
    for model in ("glm-4.6", "kimi-k2"):
        c = counter_for(model)
        full = sum(c.framing(t.role) + c.count(t.content) for t in turns)
        for cap in (None, full // 3):
            built = await build_prompt(
                turns,
                "what did we decide about the cache?",
                model,
                system="You are a reviewer.",
                extras=extras,
                policy=ContextPolicy(max_history_tokens=cap),
            )
            assert built.history.compacted == (cap is not None)
            assert built.tokens_sent == c.count_messages(built.messages)


def test_preload_warms_each_encoder_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer builds part of its matcher on the first mixed text it encodes (0.1-0.5 s):
    preload, which the instance runs on a worker thread at start-up, must pay that, not the
    first chat call on the event loop."""
    from instance.context import tokens

    encoded: list[tuple[str, str]] = []
    for family in ("glm", "kimi"):
        counter = tokens.counter_for(family)
        real = counter._tok

        class Spy:
            def __init__(self, real: object, family: str) -> None:
                self._real, self._family = real, family

            def encode_ordinary(self, text: str) -> list[int]:
                encoded.append((self._family, text))
                return self._real.encode_ordinary(text)  # type: ignore[attr-defined, no-any-return]

        monkeypatch.setattr(counter, "_tok", Spy(real, family))
    tokens.preload(("glm", "kimi"))
    assert encoded == [("glm", tokens.WARM_TEXT), ("kimi", tokens.WARM_TEXT)]


def test_agree_counts_the_common_start_of_two_word_lists() -> None:
    """The block-wise comparison finds the first difference wherever it is (inside the first
    block, at a block's edge, deep into a long run) and stops at either list's end."""
    words = [f"w{k}" for k in range(300)]
    for cut in (0, 1, 7, 8, 9, 23, 24, 25, 120, 299):
        other = [*words[:cut], "different", *words[cut + 1 :]]
        assert stripping._agree(words, 0, other, 0) == cut
        assert stripping._agree(other, 0, words, 0) == cut
    assert stripping._agree(words, 0, words, 0) == 300
    assert stripping._agree(words, 290, words, 290) == 10
    assert stripping._agree(words, 0, words[:50], 0) == 50
    assert stripping._agree(words, 5, words, 5 + 300) == 0
    assert stripping._agree(words, 3, ["x", *words[3:40]], 1) == 37


def test_token_counts_are_cached_by_text_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from instance.context import tokens

    counter = tokens.TokenCounter("glm")
    monkeypatch.setattr(tokens, "CACHE_CHARS", 1000)
    texts = [f"text {k} " * 20 for k in range(20)]  # 160+ characters each
    counts = [counter.count(t) for t in texts]
    assert counter._cache_chars <= 1000 and len(counter._cache) < len(texts)
    assert counter.cached(texts[-1]) and not counter.cached(texts[0]) and counter.cached("short")
    assert [counter.count(t) for t in texts] == counts  # evicted ones are counted again, the same
    big = "word " * 20_000  # keyed by a digest: it does not count against CACHE_CHARS
    assert counter.count(big) == counter.count(big) and counter.cached(big)
