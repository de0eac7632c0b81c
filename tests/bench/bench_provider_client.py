"""The instance's own time around a provider call: the provider client, and prompt assembly.

    .venv/bin/python tests/bench/bench_provider_client.py [--calls 400] [--turns 20] [--rounds 3]

1. Provider client: the real provider class (`Providers.open`, GLM) against the real fake
   provider (tests/fakes/provider.py), which runs in a child process on loopback so that its
   CPU does not share this process's GIL. The prompt is a realistic thread (system prompt,
   `--turns` generated agent turns, a new question). For streamed and non-streamed answers,
   per call: the wall time of `provider.chat` less the fake's own part (request arrival to last
   byte sent, as the fake stamps it), and this thread's CPU time (`time.thread_time`: the
   client alone, the fake is another process). A progress sink gets the deltas, as `consult`
   passes one.
2. Context: what `consult` does around the provider call (turns as the prompt carries them,
   the policy, `build_prompt`, the progress heartbeat's setup), CPU (process: a big thread is
   built on a worker thread) and wall time per call: the same agent thread with a short new
   prompt and with a prompt that re-sends its last two turns, and a thread of short turns as
   bench_chat.py makes them.

Medians (and p90) in microseconds. `--rounds` repeats each measurement; the median of the
rounds' medians is printed and saved as JSON under tests/bench/results/. Compare code versions
by running this file from each tree in turn (A, B, A, B ...); an older tree runs with this
venv when its root comes first on the path (the script puts it there; for the fake's child
process too).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.eventloop import loop_factory
from common.settings import load_settings
from instance.context import Turn, build_prompt
from instance.context.policy import policy_for
from instance.providers import ChatRequest, Providers
from instance.providers.models import lookup
from instance.tools.progress import progress_heartbeat
from tests.bench.context_corpus import make_thread
from tests.fakes.provider_process import FakeProviderProcess

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).with_name("results")
SYSTEM = "You are a senior engineer consulted by a coding agent for a second opinion. " * 4


async def _spent(fake: FakeProviderProcess) -> dict[str, float]:
    """The fake's seconds per request since the last look (keyed by the request's last message),
    forgetting them."""
    hits = await fake.asnapshot()
    await fake.areset()
    return {
        str(h.messages[-1]["content"]): h.sent - h.received
        for h in hits
        if h.sent is not None and h.received is not None and h.messages
    }


def _thread(turns: int) -> list[Turn]:
    th = make_thread(7001, turns)
    return [Turn(f"t{i}", t["role"], t["content"]) for i, t in enumerate(th.turns)]


def _short_thread(n: int) -> list[Turn]:
    """bench_chat's threads: short questions and the fake's short echoing replies."""
    return [
        Turn(f"s{i}", role, f"q {i} chat-normal-1-0 {i:06x}" if role == "user" else
             f"fake glm-4.6 reply #{i + 2} to: q {i - 1} chat-normal-1-0 {i - 1:06x}")
        for i, role in enumerate(["user", "assistant"] * (n // 2))
    ]  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_us": round(1e6 * statistics.median(values), 1),
        "p90_us": round(1e6 * values[int(0.9 * (len(values) - 1))], 1),
    }


class _Sink:
    def __init__(self) -> None:
        self.chars = 0

    def on_delta(self, text: str) -> None:
        self.chars += len(text)


async def provider_client(
    port: int, fake: FakeProviderProcess, turns: list[Turn], calls: int
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    settings = load_settings(
        glm_api_key="k-bench", glm_api_url=url + "/api/paas/v4", kimi_api_key="", provider_max_concurrency=4
    )
    info = lookup("glm-4.6")
    assert info is not None
    history = [{"role": t.role, "content": t.content} for t in turns]
    out: dict[str, Any] = {}
    async with Providers.open(settings) as providers:
        _, provider = providers.resolve("glm-4.6")
        for stream in (True, False):
            for k in range(20):  # warm: the pool's connection, the tokenizer in the fake
                request = ChatRequest(
                    info,
                    [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": f"w{k}"}],
                )
                request.stream = stream
                await provider.chat(request)
            await _spent(fake)
            walls: dict[str, float] = {}
            cpus: list[float] = []
            gc.collect()
            for k in range(calls):
                question = f"q {k} {'s' if stream else 'f'} what do you think of the retry loop?"
                request = ChatRequest(
                    info,
                    [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": question}],
                    stream=stream,
                )
                sink = _Sink()
                cpu = time.thread_time()
                wall = time.perf_counter()
                result = await provider.chat(request, on_delta=sink.on_delta)
                walls[question] = time.perf_counter() - wall
                cpus.append(time.thread_time() - cpu)
                assert question in result.content
            spent = await _spent(fake)
            beyond = [walls[q] - spent[q] for q in walls if q in spent]
            out["stream" if stream else "full"] = {
                "beyond_fake": _summary(beyond),
                "client_cpu": _summary(cpus),
                "fake": _summary(list(spent.values())),
            }
    return out


class _Ctx:
    async def report_progress(self, *args: Any) -> None:
        return None


async def context_stage(turns: list[Turn], calls: int) -> dict[str, Any]:
    settings = load_settings(glm_api_key="k-bench", kimi_api_key="")
    info = lookup("glm-4.6")
    assert info is not None
    ctx: Any = _Ctx()
    echo = "\n\n".join(f"{t.role}: {t.content}" for t in turns[-2:])
    small = _short_thread(len(turns))
    out: dict[str, Any] = {}
    for name, thread_turns, prompt_of in (
        ("agent_thread_short_prompt", turns, lambda k: f"q {k} chat-normal-1-0 {k:06x}: what next?"),
        ("agent_thread_echoing_prompt", turns, lambda k: f"{echo}\n\nq {k}: and now, what next?"),
        ("short_turns_short_prompt", small, lambda k: f"q {k} chat-normal-1-0 {k:06x}"),
    ):
        cpus: list[float] = []
        walls: list[float] = []
        for k in range(calls + 20):
            prompt = prompt_of(k)
            # The stored turns are new string objects each call, as they come from storage
            # (a string caches its hash: reusing the objects would hide the cost of hashing).
            fresh = [(t.id, t.role, (t.content + " ")[:-1]) for t in thread_turns]
            cpu = time.process_time()  # a big thread is built on a worker thread
            wall = time.perf_counter()
            # what `consult` does around the provider call
            thread = [Turn(*t) for t in fresh]
            built = await build_prompt(
                thread,
                prompt,
                info,
                system=SYSTEM,
                policy=policy_for(settings, info),
            )
            async with progress_heartbeat(ctx, f"waiting for {info.name}") as progress:
                progress.on_delta("x")
            if k >= 20:
                cpus.append(time.process_time() - cpu)
                walls.append(time.perf_counter() - wall)
            assert built.messages
        out[name] = {"cpu": _summary(cpus), "wall": _summary(walls)}
    return out


def _median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    first = rounds[0]
    if isinstance(first, dict):
        return {k: _median_of([r[k] for r in rounds]) for k in first}
    return round(statistics.median(rounds), 1)  # type: ignore[arg-type]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["provider", "context"])
    ap.add_argument("--label", default="", help="a name for this run, kept in the JSON (e.g. old/new)")
    ap.add_argument(
        "--provider-thread",
        choices=["agent", "short"],
        default="agent",
        help="the provider part's prompt: generated agent turns, or bench_chat's short turns",
    )
    args = ap.parse_args()
    root = ROOT
    turns = _thread(args.turns)
    print(
        f"thread: {len(turns)} turns, {sum(len(t.content) for t in turns)} characters; "
        f"{args.calls} calls x {args.rounds} rounds; code: {root}",
        file=sys.stderr,
    )
    result: dict[str, Any] = {}
    if args.only != "context":
        with FakeProviderProcess().running() as fake:
            try:
                sent = turns if args.provider_thread == "agent" else _short_thread(len(turns))
                rounds = [
                    await provider_client(fake.port, fake, sent, args.calls) for _ in range(args.rounds)
                ]
            finally:
                await fake.aclose()
        result["provider"] = _median_of(rounds)
    if args.only != "provider":
        result["context"] = _median_of([await context_stage(turns, args.calls) for _ in range(args.rounds)])
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"provider-client-{stamp}{'-' + args.label if args.label else ''}.json"
    meta = {"when": stamp, "label": args.label, "load": os.getloadavg(), "code": str(ROOT), **vars(args)}
    out.write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the instance's loop (uvloop)
        runner.run(main())
