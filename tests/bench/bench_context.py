"""Context engineering, measured side by side on generated long agent threads.

    .venv/bin/python tests/bench/bench_context.py [--threads 12 --seed 7 --turns 36]

1. Fact survival: for each thread, the history is fitted into 25 %, 50 % and 75 % of its full
   token count (GLM tokens, template framing included) by three strategies, and we count the
   planted facts whose needle is still in the messages:
   - truncation: drop the oldest turns until it fits (what `chat` did before);
   - masking: replace every bulk block (code, logs, traces) with a placeholder, then drop the
     oldest turns until it fits ("observation masking" alone);
   - compaction: `instance.context.compaction.compact` (recent turns verbatim, bulk masked
     first, prose kept by importance score).
2. Echo overhead: a client that re-sends the whole history with every prompt (rotating through
   8 formatting styles) against the ideal client that sends only the new text, in prompt
   tokens summed over every call of every thread, with stripping on and off.

Targets: overhead <= 1.02 with stripping; at 25 % >= 95 % of critical facts and >= 15 points
above truncation. Prints a table and writes tests/bench/results/bench_context.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from instance.context.builder import ContextPolicy, Turn, build_prompt
from instance.context.compaction import HistoryTurn, compact, digest
from instance.context.scoring import split_units
from instance.context.tokens import counter_for
from tests.bench.context_corpus import Thread, make_corpus
from tests.bench.echo_styles import ECHO_STYLES

SYSTEM = "You are a senior engineer consulted by a coding agent for a second opinion."
FRACTIONS = (0.1, 0.25, 0.5, 0.75)  # 10 %: beyond the targets, to show where it bends
RECENT = 4


def _drop_oldest(msgs: list[dict[str, str]], budget: int, cost: Any) -> list[dict[str, str]]:
    kept = list(msgs)
    while kept and sum(cost(m) for m in kept) > budget:
        kept.pop(0)
    return kept


def _masked(turn: dict[str, str], index: int) -> str:
    out = []
    for u in split_units(turn["content"], 0, turn["role"]):
        out.append(f"[masked {u.kind} block from turn {index}]" if u.kind == "bulk" else u.text)
    return " ".join(out)


def survival(threads: list[Thread]) -> dict[str, Any]:
    c = counter_for("glm-4.6")

    def cost(m: dict[str, str]) -> int:
        return c.framing(m["role"]) + c.count(m["content"])

    res: dict[str, dict[str, dict[str, list[int]]]] = {}
    timings: list[float] = []
    for th in threads:
        msgs = [dict(t) for t in th.turns]
        full = sum(cost(m) for m in msgs)
        for f in FRACTIONS:
            budget = int(full * f)
            trunc = _drop_oldest(msgs, budget, cost)
            masked = _drop_oldest(
                [{"role": m["role"], "content": _masked(m, i + 1)} for i, m in enumerate(msgs)], budget, cost
            )
            turns = [HistoryTurn(str(i), i + 1, m["role"], m["content"]) for i, m in enumerate(msgs)]
            t0 = time.perf_counter()
            comp = compact(turns, budget, c.count, c.framing, recent_turns=RECENT).messages
            timings.append(time.perf_counter() - t0)
            assert sum(cost(m) for m in comp) <= budget + c.framing("user"), "compaction overshot its budget"
            for name, out in (("truncation", trunc), ("masking", masked), ("compaction", comp)):
                text = "\n".join(m["content"] for m in out)
                bucket = res.setdefault(f"{int(f * 100)}%", {}).setdefault(
                    name, {"critical": [0, 0], "all": [0, 0]}
                )
                for fact in th.facts:
                    hit = fact.needle in text
                    bucket["all"][0] += hit
                    bucket["all"][1] += 1
                    if fact.critical:
                        bucket["critical"][0] += hit
                        bucket["critical"][1] += 1
    table = {
        frac: {
            name: {k: round(100.0 * v[0] / max(1, v[1]), 1) for k, v in b.items()} for name, b in by.items()
        }
        for frac, by in res.items()
    }
    return {"survival_pct": table, "compact_ms_mean": round(1000 * sum(timings) / len(timings), 2)}


async def echo_overhead(threads: list[Thread], turns_per_thread: int = 20) -> dict[str, Any]:
    """Prompt tokens sent over whole threads: echoing client (strip on/off) vs ideal client."""
    model = "glm-4.6"
    totals = {"ideal": 0, "echo_stripped": 0, "echo_unstripped": 0}
    policy_on = ContextPolicy(history_share=1.0, strip=True)
    policy_off = ContextPolicy(history_share=1.0, strip=False)
    for k, th in enumerate(threads):
        turns = th.turns[:turns_per_thread]
        stored_on: list[Turn] = []
        stored_off: list[Turn] = []
        ideal: list[Turn] = []
        for i in range(0, len(turns) - 1, 2):
            new = turns[i]["content"]
            style = list(ECHO_STYLES.values())[(k + i // 2) % len(ECHO_STYLES)]
            echoed = "\n\n".join(style(t.role, t.content) for t in ideal)
            prompt = (echoed + "\n\n" + new) if echoed else new
            reply = turns[i + 1]["content"]
            for name, stored, text, policy in (
                ("ideal", ideal, new, policy_on),
                ("echo_stripped", stored_on, prompt, policy_on),
                ("echo_unstripped", stored_off, prompt, policy_off),
            ):
                built = await build_prompt(
                    stored, text, model, system=SYSTEM, policy=policy, context_window=10_000_000
                )
                totals[name] += built.tokens_sent
                stored.append(Turn(f"{name}{i}", "user", built.user_content))
                stored.append(Turn(f"{name}{i}a", "assistant", reply))
    return {
        "prompt_tokens": totals,
        "overhead_with_stripping": round(totals["echo_stripped"] / totals["ideal"], 4),
        "overhead_without_stripping": round(totals["echo_unstripped"] / totals["ideal"], 4),
    }


def prefix_reuse(threads: list[Thread], fraction: float = 0.5) -> dict[str, Any]:
    """A growing thread over its budget: how often a call's prompt starts with the previous one.

    The budget is `fraction` of the final thread's history; the thread grows two turns per
    call. A call "reuses" when the previous call's whole history is a prefix of its own, which
    is what a provider's prompt cache needs to hit.
    """
    c = counter_for("glm-4.6")
    calls = reused = compacted = 0
    for th in threads:
        turns = [HistoryTurn(str(i), i + 1, t["role"], t["content"]) for i, t in enumerate(th.turns)]
        budget = int(fraction * sum(c.framing(t.role) + c.count(t.content) for t in turns))
        prev: list[dict[str, str]] | None = None
        for n in range(2, len(turns) + 1, 2):
            out = compact(turns[:n], budget, c.count, c.framing, recent_turns=RECENT)
            if prev is not None:
                calls += 1
                compacted += out.compacted
                reused += out.messages[: len(prev)] == prev
            prev = out.messages
    return {
        "calls": calls,
        "compacted_calls": compacted,
        "prefix_reused_pct": round(100.0 * reused / max(1, calls), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--turns", type=int, default=36)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--phrasing", choices=["main", "alt", "plain"], default="main", help="fact phrasings of the corpus"
    )
    ap.add_argument(
        "--corpus", help="a corpus JSON file (context_corpus.py output) instead of generating one"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_context.json"))
    args = ap.parse_args()
    if args.corpus:
        from tests.bench.context_corpus import load_corpus

        threads = load_corpus(args.corpus)
    else:
        threads = make_corpus(args.threads, args.seed, args.turns, args.phrasing)
    c = counter_for("glm-4.6")
    sizes = [sum(c.count(t["content"]) for t in th.turns) for th in threads]
    facts = sum(len(th.facts) for th in threads)
    crit = sum(f.critical for th in threads for f in th.facts)
    surv = survival(threads)
    echo = asyncio.run(echo_overhead(threads))
    reuse = prefix_reuse(threads)
    result = {
        "corpus": {
            "threads": len(threads),
            "turns": args.turns,
            "seed": args.seed,
            "facts": facts,
            "critical_facts": crit,
            "tokens_per_thread_mean": sum(sizes) // len(sizes),
        },
        **surv,
        "echo": echo,
        "prefix_reuse_at_50pct": reuse,
        "determinism_digest": digest(json.dumps(surv["survival_pct"], sort_keys=True)),
    }
    print(
        f"corpus: {len(threads)} threads x {args.turns} turns, ~{result['corpus']['tokens_per_thread_mean']} "
        f"GLM tokens each, {facts} planted facts ({crit} critical)"
    )
    print(f"{'budget':>7} {'strategy':>11} {'critical %':>11} {'all %':>7}")
    for frac, by in surv["survival_pct"].items():
        for name, v in by.items():
            print(f"{frac:>7} {name:>11} {v['critical']:>11} {v['all']:>7}")
    print(f"compaction: {surv['compact_ms_mean']} ms per call (mean)")
    print(
        f"echo overhead vs ideal client: {echo['overhead_with_stripping']} with stripping, "
        f"{echo['overhead_without_stripping']} without ({echo['prompt_tokens']})"
    )
    print(
        f"growing thread, budget 50 % of its final size: {reuse['prefix_reused_pct']} % of "
        f"{reuse['calls']} calls start with the previous call's prompt "
        f"({reuse['compacted_calls']} were compacted)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
