"""Context engineering end to end: MCP client -> instance -> fake provider, Postgres, Redis.

Threads look like agent traffic (tests/bench/context_corpus.py): long assistant answers are
scripted into the fake provider, prompts carry logs, traces and code.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import asyncpg
import pytest
from mcp import Client

from instance.context.tokens import counter_for
from tests.bench.context_corpus import make_thread
from tests.bench.echo_styles import ECHO_STYLES, echo
from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import ERAS, InstanceProc, SpawnInstance, connect, new_session

GLM = counter_for("glm-4.6")


@pytest.fixture(scope="module")
def ctx_instance(session_spawner: SpawnInstance) -> InstanceProc:
    # Phases 1-2 in isolation: notes captured from the corpus turns (phase 3) would join the prompt.
    return session_spawner("inst_ctx", EXAI_THREAD_MAX_TURNS="200", EXAI_NOTE_CAPTURE="off")


def _ok(result: Any) -> dict[str, Any]:
    assert not result.is_error, " ".join(getattr(c, "text", "") for c in result.content)
    return dict(result.structured_content)


async def _stored(dsn: str, cid: str, n: int) -> list[asyncpg.Record]:
    """The thread's rows in Postgres once all `n` have been flushed (write-behind)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            rows = await conn.fetch(
                "SELECT id, role, content, metadata FROM messages WHERE conversation_id = $1"
                " ORDER BY created_at, seq",
                cid,
            )
            if len(rows) >= n:
                return list(rows)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"thread {cid} has {len(rows)} stored turns, expected {n}")


async def _say(
    client: Client, fake: FakeProvider, prompt: str, reply: str, cid: str | None, **args: Any
) -> dict[str, Any]:
    fake.script(Behaviour(content=reply))
    call = {"prompt": prompt, "model": "glm-4.6", **args}
    if cid:
        call["continuation_id"] = cid
    return _ok(await client.call_tool("chat", call))


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


@pytest.mark.parametrize("style", list(ECHO_STYLES))
async def test_echoed_history_is_stripped_in_every_style(
    fake: FakeProvider, ctx_instance: InstanceProc, pg_dsn: str, style: str
) -> None:
    th = make_thread(100 + list(ECHO_STYLES).index(style), turns=6)
    mode = ERAS[list(ECHO_STYLES).index(style) % 2]
    turns = th.turns
    question = "Given all that, which of the two options would you ship first, and why?"
    async with connect(ctx_instance, mode, session=new_session()) as client:
        first = await _say(client, fake, turns[0]["content"], turns[1]["content"], None)
        cid = first["continuation_id"]
        await _say(client, fake, turns[2]["content"], turns[3]["content"], cid)
        third = await _say(client, fake, echo(turns[:4], style) + "\n\n" + question, turns[5]["content"], cid)

    sent = fake.snapshot()[-1].messages
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sent[-1]["content"].endswith(question)
    for t in turns[:4]:  # nothing of the echoed turns reaches the provider a second time
        opening = " ".join(_words(t["content"]).split()[:12])
        assert opening not in _words(sent[-1]["content"]), f"{style}: echo of {opening!r} was sent"
        in_thread = sum(_words(x["content"]).count(opening) for x in turns[:4])
        assert sum(_words(m["content"]).count(opening) for m in sent) == in_thread
    stripped = third["metadata"]["context"]["stripped"]
    assert stripped["turns_referred"] == [1, 2, 3, 4]
    assert stripped["tokens_stripped"] > 0.9 * GLM.count(echo(turns[:4], style))

    rows = await _stored(pg_dsn, cid, 6)
    user = rows[4]
    assert user["role"] == "user" and user["content"].endswith(question)
    assert len(user["content"]) < len(question) + 40, user["content"]
    meta = json.loads(user["metadata"])
    referred = {tid for cut in meta["stripped"]["cuts"] for tid in cut["turn_ids"]}
    assert referred == {str(r["id"]) for r in rows[:4]}
    assert meta["stripped"]["tokens"] == stripped["tokens_stripped"]


def _control_prompts(n: int, base: list[str], seed: int = 5) -> list[str]:
    """Prompts quoting code, logs and documents this thread has never seen, or short quotes of it."""
    rng = random.Random(seed)
    ids = lambda: f"{rng.choice('abcdefghij')}{rng.randint(0, 10**9):x}"  # noqa: E731
    out: list[str] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines = [f"def {ids()}(self, {ids()}: int) -> str:"] + [
                f"    {ids()} = self.{ids()}({ids()}, timeout={rng.randint(1, 99)})"
                for _ in range(rng.randint(4, 20))
            ]
            body = "```python\n" + "\n".join(lines) + "\n```"
            out.append(f"Why does this fail under load?\n\n{body}")
        elif kind == 1:
            lines = [
                f"2026-04-{rng.randint(10, 28)} 09:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
                f"{rng.choice(['INFO', 'WARN', 'ERROR'])} {ids()} request={ids()} "
                f"took={rng.randint(1, 999)}ms"
                for _ in range(rng.randint(5, 30))
            ]
            out.append("Here is the log from staging:\n" + "\n".join(lines) + "\nWhat stands out?")
        elif kind == 2:
            sentences = [
                f"Section {rng.randint(1, 40)} of the {ids()} spec says the {ids()} field is "
                f"{rng.choice(['optional', 'required', 'deprecated'])} and must be at most "
                f"{rng.randint(2, 900)} bytes."
                for _ in range(rng.randint(3, 12))
            ]
            out.append(
                "From the design document:\n\n> " + "\n> ".join(sentences) + "\n\nDoes our code follow it?"
            )
        else:  # a short deliberate quote of a stored turn (below the threshold)
            words = rng.choice(base).split()
            k = rng.randint(0, max(0, len(words) - 16))
            quote = " ".join(words[k : k + rng.randint(5, 15)])
            out.append(f'Question {i}: you wrote "{quote}" — can you expand on that?')
    assert len(set(out)) == n
    return out


async def test_control_prompts_are_never_stripped(fake: FakeProvider, ctx_instance: InstanceProc) -> None:
    th = make_thread(77, turns=4)
    prompts = _control_prompts(1000, [t["content"] for t in th.turns])
    stripped: list[str] = []

    async def thread(client: Client, mine: list[str]) -> None:
        first = await _say(client, fake, th.turns[0]["content"], th.turns[1]["content"], None)
        cid = first["continuation_id"]
        await _say(client, fake, th.turns[2]["content"], th.turns[3]["content"], cid)
        for prompt in mine:
            out = _ok(await client.call_tool("chat", {"prompt": prompt, "continuation_id": cid}))
            if out["metadata"]["context"]["stripped"]["cuts"]:
                stripped.append(prompt)

    # An instance serves one session at a time (the router's binding): 25 threads, five at a time,
    # through one session per protocol era.
    sem = asyncio.Semaphore(5)

    async def limited(client: Client, k: int) -> None:
        async with sem:
            await thread(client, prompts[k::25])

    for era, ks in ((ERAS[0], range(0, 25, 2)), (ERAS[1], range(1, 25, 2))):
        async with connect(ctx_instance, era, session=new_session()) as client:
            await asyncio.gather(*(limited(client, k) for k in ks))
    assert not stripped, f"{len(stripped)} control prompts were stripped, e.g. {stripped[0]!r}"
    sent_users = [h.messages[-1]["content"] for h in fake.snapshot() if h.messages[-1]["content"] in prompts]
    assert len(set(sent_users)) == 1000, "every control prompt must reach the provider unchanged"


async def test_echoing_client_stores_what_a_quiet_client_stores(
    fake: FakeProvider, ctx_instance: InstanceProc, pg_dsn: str
) -> None:
    th = make_thread(31, turns=50)
    styles = list(ECHO_STYLES)
    stored: dict[str, int] = {}
    async with connect(ctx_instance, "2026-07-28", session=new_session()) as client:
        for echoing in (False, True):
            cid = None
            for i in range(0, 50, 2):
                new = th.turns[i]["content"]
                prompt = new
                if echoing and i:
                    prompt = echo(th.turns[:i], styles[(i // 2) % len(styles)]) + "\n\n" + new
                out = await _say(client, fake, prompt, th.turns[i + 1]["content"], cid)
                cid = out["continuation_id"]
                if echoing and i:  # every echoed turn long enough to count as a repeat was cut
                    long_enough = [k + 1 for k in range(i) if len(th.turns[k]["content"].split()) >= 20]
                    referred = out["metadata"]["context"]["stripped"]["turns_referred"]
                    assert set(long_enough) <= set(referred), (long_enough, referred)
            rows = await _stored(pg_dsn, cid, 50)
            stored["echo" if echoing else "quiet"] = sum(GLM.count(r["content"]) for r in rows)
    echoed_total = sum(GLM.count(echo(th.turns[:i], "verbatim")) for i in range(2, 50, 2))
    assert echoed_total > 10 * stored["quiet"]  # the echoing client really re-sent a lot
    assert stored["echo"] <= 1.02 * stored["quiet"], stored


async def test_compaction_through_chat_is_deterministic_and_reported(
    fake: FakeProvider, ctx_instance: InstanceProc
) -> None:
    th = make_thread(9, turns=20)
    question = "Summarise the decisions we took and what is still open."
    sent: list[list[dict[str, Any]]] = []
    results: list[dict[str, Any]] = []
    for mode in ERAS:
        async with connect(ctx_instance, mode, session=new_session()) as client:
            cid = None
            for i in range(0, 18, 2):
                cid = (await _say(client, fake, th.turns[i]["content"], th.turns[i + 1]["content"], cid))[
                    "continuation_id"
                ]
            full = GLM.count_messages(fake.snapshot()[-1].messages)
            results.append(
                await _say(client, fake, question, "ok", cid, history_tokens=full // 4, recent_turns=2)
            )
            sent.append(fake.snapshot()[-1].messages)
    assert sent[0] == sent[1], "the same thread and budget must give the same prompt"
    meta = results[0]["metadata"]
    history = meta["context"]["history"]
    assert history["turns_compacted"] >= 12 and history["turns_compacted"] + history["turns_verbatim"] == 18
    assert history["tokens_after"] <= meta["context"]["history_budget"] + 8 < history["tokens_before"]
    assert history["blocks_masked"] + history["sentences_dropped"] > 0
    assert "compacted" in sent[0][1]["content"] and sent[0][1]["content"].startswith("[Earlier turns")
    # tokens the result reports = tokens the provider billed (the fake bills with the same tokenizer)
    assert meta["tokens_sent"] == meta["tokens_in"] == GLM.count_messages(sent[0])
    sent_text = "\n".join(m["content"] for m in sent[0])
    critical = [f for f in th.facts if f.turn < 18 and f.critical]
    assert critical and all(f.needle in sent_text for f in critical)


async def test_summaries_are_off_by_default_and_paid_once_when_on(
    fake: FakeProvider, ctx_instance: InstanceProc, spawn_instance: SpawnInstance
) -> None:
    from instance.context.policy import SUMMARY_PROMPT

    th = make_thread(12, turns=12)

    def summary_calls() -> int:
        return sum(1 for h in fake.snapshot() if h.messages[0]["content"] == SUMMARY_PROMPT)

    async def compacted_call(inst: InstanceProc) -> dict[str, Any]:
        """A thread of logs and code, then one call whose budget forces its blocks to be masked."""
        async with connect(inst, "legacy", session=new_session()) as client:
            cid = None
            for i in range(0, 10, 2):
                args = {"prompt": th.turns[i]["content"], **({"continuation_id": cid} if cid else {})}
                cid = _ok(await client.call_tool("chat", args))["continuation_id"]
            args = {"prompt": "And now?", "continuation_id": cid, "history_tokens": 700, "recent_turns": 2}
            return _ok(await client.call_tool("chat", args))

    off = await compacted_call(ctx_instance)
    assert off["metadata"]["context"]["history"]["blocks_masked"] > 0
    assert summary_calls() == 0 and off["metadata"]["context"]["history"]["summarised"] == 0

    inst = spawn_instance(EXAI_CONTEXT_SUMMARIES="true")
    first = await compacted_call(inst)
    paid = summary_calls()
    history = first["metadata"]["context"]["history"]
    assert paid > 0 and history["summarised"] > 0
    last = [h for h in fake.snapshot() if h.messages[0]["content"] != SUMMARY_PROMPT][-1]
    assert "summary: fake" in last.messages[1]["content"]
    # the same blocks in another thread: every summary comes from the cache
    again = await compacted_call(inst)
    assert again["metadata"]["context"]["history"]["summarised"] == history["summarised"]
    assert summary_calls() == paid
