"""Context phases 3-4: outline size, tokens sent with and without disclosure, notes recall, leaks.

    python tests/bench/bench_disclosure.py [--corpus-files 400]

What it measures, in one run:
1. Outline share: over a corpus of real source files (the installed packages' own Python
   sources, and their Markdown files), the tokens of the outline block `chat` would send
   divided by the tokens of the whole file. Files at or under the whole-file threshold
   (EXAI_FILE_FULL_TOKENS, 600) are sent whole, so the share is reported for the larger ones,
   which are the ones sent as outlines. Target: <= 10 % in aggregate.
2. Tokens sent over a 20-turn thread (10 chat calls, 20 stored messages, the thread limit)
   that consults the same 10 real source files on every call, through a real instance and
   the fake provider; the tokens are counted over every message each provider request
   carried. "With disclosure" is what the instance sent; "without" replays the previous
   assembly over the same prompts and answers (every file pasted whole into every call).
   Three calls also ask for a line range and one file changes halfway, as an agent would.
3. Notes recall across a restart: notes written by hand and captured from turns, then the
   instance is stopped and started again; the share whose text is in the next prompt of the
   thread, then once more with the history squeezed by phase-2 compaction (32 tokens, no
   verbatim turns). Target: 100 % both times.
4. Cross-scope leaks: 4 sessions x 2 threads, each with its own session and thread notes;
   every chat's prompt is searched for any other scope's note. Target: 0.

Token counts come from `instance/context/tokens.py` (the providers' own vocabularies).
Uses EXAI_TEST_DATABASE_URL / EXAI_TEST_REDIS_URL (defaults: the local servers).
Prints a table and saves JSON under tests/bench/results/disclosure-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from common.migrate import migrate
from instance.context import disclosure
from instance.context.tokens import count_tokens
from instance.tools.chat import SYSTEM_PROMPT
from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import _SCRUB, INTERNAL_TOKEN, InstanceProc, connect
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "glm-4.6"
PACKAGES = (
    "mcp",
    "httpx",
    "aiohttp",
    "asyncpg",
    "redis",
    "pydantic",
    "starlette",
    "anyio",
    "uvicorn",
    "_pytest",
)


def _with_db(dsn: str, db: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + db))


def _tokens(text: str) -> int:
    return count_tokens(text, MODEL)


# --- 1. outline share -------------------------------------------------------------------------


def _corpus(limit: int) -> dict[str, list[Path]]:
    site = Path(sysconfig.get_paths()["purelib"])
    py: list[Path] = []
    for pkg in PACKAGES:
        py.extend(sorted((site / pkg).rglob("*.py")))
    md = sorted(site.rglob("*.md")) + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    rng = random.Random(7)
    if len(py) > limit:
        py = sorted(rng.sample(py, limit))
    return {"python": py, "markdown": md}


def _outline_share(files: list[Path], full_below: int) -> dict[str, Any]:
    shares, outline_sum, file_sum, whole = [], 0, 0, 0
    for path in files:
        data = path.read_bytes()
        if not data.strip() or len(data) > disclosure.MAX_FILE_BYTES:
            continue
        f = disclosure.FileBytes(str(path), data, "0" * 64)
        ft = _tokens(f.text)
        if ft <= full_below:
            whole += 1
            continue
        ot = _tokens(disclosure._render_outline(f, file_tokens=ft, model=MODEL))
        shares.append(ot / ft)
        outline_sum += ot
        file_sum += ft
    shares.sort()
    return {
        "files_outlined": len(shares),
        "files_sent_whole": whole,
        "file_tokens": file_sum,
        "outline_tokens": outline_sum,
        "aggregate_share": round(outline_sum / file_sum, 4) if file_sum else None,
        "median_share": round(statistics.median(shares), 4) if shares else None,
        "p90_share": round(shares[int(len(shares) * 0.9)], 4) if shares else None,
        "files_at_or_under_10pct": round(sum(s <= 0.10 for s in shares) / len(shares), 4) if shares else None,
    }


# --- the instance under test ------------------------------------------------------------------


def _instance(pg: str, redis_url: str, fake: FakeProvider, home: Path, roots: Path) -> InstanceProc:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    port = free_port()
    env.update(
        {
            "DATABASE_URL": pg,
            "REDIS_URL": redis_url,
            "EXAI_REDIS_PREFIX": f"exaibench{secrets.token_hex(3)}",
            "EXAI_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "GLM_API_KEY": "bench",
            "GLM_API_URL": fake.glm_url,
            "KIMI_API_KEY": "bench",
            "KIMI_API_URL": fake.kimi_url,
            "DEFAULT_MODEL": MODEL,
            "EXAI_ALLOWED_ROOTS": str(roots),
            "EXAI_INSTANCE_ID": "bench_disclosure",
            "EXAI_INSTANCE_PORT": str(port),
            "EXAI_STATE_DIR": str(home / "state"),
            "EXAI_NOTES_BUDGET_TOKENS": "4096",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return InstanceProc(id="bench_disclosure", port=port, env=env, log_path=home / "instance.log").start()


def _ok(result: Any) -> dict[str, Any]:
    if result.is_error:
        raise RuntimeError(" ".join(getattr(c, "text", "") for c in result.content))
    return dict(result.structured_content)


def _sent_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(_tokens(str(m.get("content", ""))) for m in messages)


# --- 2. tokens over a thread ------------------------------------------------------------------


def _pick_files(corpus: list[Path], dest: Path) -> list[Path]:
    """10 real source files of 6-40 KB (the kind an agent asks about), copied under the root."""
    picked = [p for p in corpus if 6_000 <= p.stat().st_size <= 40_000][:10]
    out = []
    for i, src in enumerate(picked):
        target = dest / f"{i:02d}_{src.parent.name}_{src.name}"
        shutil.copyfile(src, target)
        out.append(target)
    return out


async def _thread_tokens(inst: InstanceProc, fake: FakeProvider, files: list[Path]) -> dict[str, Any]:
    fake.reset(Behaviour(content="Looked at the files; the retry logic is in the second one."))
    calls = 10  # 20 stored turns: the thread limit
    ranged = {2: f"{files[0]}:1-60", 5: f"{files[3]}:20-90", 8: f"{files[7]}:1-40"}
    cid = None
    with_tokens: list[int] = []
    baseline: list[int] = []
    history: list[str] = []  # prompts and answers as the previous assembly stored them
    async with connect(inst, "2026-07-28", session="s_bench_files") as client:
        for call in range(calls):
            if call == 6:
                with files[5].open("a") as fh:
                    fh.write("\n# edited by the agent between two calls\n")
            specs = [str(p) for p in files] + ([ranged[call]] if call in ranged else [])
            prompt = f"Call {call}: how do these modules handle errors and retries?"
            args: dict[str, Any] = {"prompt": prompt, "files": specs, "model": MODEL}
            if cid:
                args["continuation_id"] = cid
            result = _ok(await client.call_tool("chat", args))
            cid = result["continuation_id"]
            with_tokens.append(_sent_tokens(fake.snapshot()[-1].messages))
            whole = "\n\n".join(f'<file path="{p}">\n{p.read_text()}\n</file>' for p in files)
            old_turn = prompt + "\n\n" + whole
            baseline.append(_tokens(SYSTEM_PROMPT) + sum(_tokens(t) for t in history) + _tokens(old_turn))
            history += [prompt, result["content"]]
    file_tokens = sum(_tokens(p.read_text()) for p in files)
    return {
        "calls": calls,
        "stored_turns": calls * 2,
        "files": len(files),
        "file_tokens_per_call": file_tokens,
        "tokens_sent_with_disclosure": sum(with_tokens),
        "tokens_sent_without_disclosure": sum(baseline),
        "ratio_with_over_without": round(sum(with_tokens) / sum(baseline), 4),
        "per_call_with": with_tokens,
        "per_call_without": baseline,
    }


# --- 3. notes recall across a restart -----------------------------------------------------------


async def _notes_recall(inst: InstanceProc, fake: FakeProvider) -> dict[str, Any]:
    fake.reset()
    fake.script(
        Behaviour(content="Decision: queue = Redis streams\nTODO: document the cursor format"),
        Behaviour(content="Error: consumer group missing\nFix: create it with MKSTREAM on start"),
    )
    fake.default = Behaviour(content="ok")
    expected: list[str] = []
    async with connect(inst, "legacy", session="s_bench_recall") as client:
        first = _ok(
            await client.call_tool("chat", {"prompt": "Constraint: keep Postgres the source of truth."})
        )
        cid = first["continuation_id"]
        _ok(await client.call_tool("chat", {"prompt": "and the consumer?", "continuation_id": cid}))
        for i in range(12):
            body = f"RECALL-{i} manual note number {i} about the design"
            expected.append(body)
            scope: dict[str, Any] = {"scope": "thread", "continuation_id": cid} if i % 2 else {}
            _ok(
                await client.call_tool(
                    "note_write", {"key": f"m{i}", "body": body, "importance": i % 5, **scope}
                )
            )
        for _ in range(100):  # captured notes are written in the background
            listed = _ok(await client.call_tool("note_list", {"scope": "thread", "continuation_id": cid}))
            if sum(n["source"] == "auto" for n in listed["notes"]) >= 4:
                break
            await asyncio.sleep(0.1)
        auto = [n["body"] for n in listed["notes"] if n["source"] == "auto"]
    expected += auto
    inst.stop()
    inst.start()
    async with connect(inst, "legacy", session="s_bench_recall") as client:
        _ok(await client.call_tool("chat", {"prompt": "summarise", "continuation_id": cid}))
        sent = fake.snapshot()[-1].messages[-1]["content"]
        # The same thread squeezed by phase-2 compaction: a tiny history budget, no verbatim turns.
        squeezed = _ok(
            await client.call_tool(
                "chat",
                {"prompt": "once more", "continuation_id": cid, "history_tokens": 32, "recent_turns": 0},
            )
        )
        compacted_prompt = "\n".join(str(m["content"]) for m in fake.snapshot()[-1].messages)
    found = sum(body in sent for body in expected)
    found_compacted = sum(body in compacted_prompt for body in expected)
    history = squeezed["metadata"]["context"]["history"]
    return {
        "notes": len(expected),
        "captured_automatically": len(auto),
        "in_prompt_after_restart": found,
        "recall": round(found / len(expected), 4),
        "in_prompt_after_compaction": found_compacted,
        "recall_after_compaction": round(found_compacted / len(expected), 4),
        "compaction": {k: history.get(k) for k in ("tokens_before", "tokens_after", "turns_omitted")},
    }


# --- 4. cross-scope leaks -----------------------------------------------------------------------


async def _leaks(inst: InstanceProc, fake: FakeProvider) -> dict[str, Any]:
    fake.reset(Behaviour(content="ok"))
    markers: dict[tuple[str, str], str] = {}
    threads: dict[tuple[str, int], str] = {}
    sessions = [f"s_leak_{i}_{secrets.token_hex(3)}" for i in range(4)]
    for s in sessions:
        async with connect(inst, "2026-07-28", session=s) as client:
            markers[("session", s)] = f"LEAK-S-{secrets.token_hex(4)}"
            _ok(await client.call_tool("note_write", {"key": "own", "body": markers[("session", s)]}))
            for t in range(2):
                cid = _ok(await client.call_tool("chat", {"prompt": f"thread {t}"}))["continuation_id"]
                threads[(s, t)] = cid
                markers[("thread", cid)] = f"LEAK-T-{secrets.token_hex(4)}"
                args = {
                    "key": "own",
                    "body": markers[("thread", cid)],
                    "scope": "thread",
                    "continuation_id": cid,
                }
                _ok(await client.call_tool("note_write", args))
    checks = leaks = 0
    for s in sessions:
        async with connect(inst, "2026-07-28", session=s) as client:
            for t in range(2):
                cid = threads[(s, t)]
                _ok(await client.call_tool("chat", {"prompt": "check", "continuation_id": cid}))
                sent = "\n".join(str(m["content"]) for m in fake.snapshot()[-1].messages)
                allowed = {markers[("session", s)], markers[("thread", cid)]}
                for marker in markers.values():
                    checks += 1
                    if marker in allowed:
                        leaks += marker not in sent  # counted as a miss, reported below
                    elif marker in sent:
                        leaks += 1
    return {"sessions": len(sessions), "threads": len(threads), "checks": checks, "leaks_or_misses": leaks}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-files", type=int, default=400, help="Python files sampled from the corpus")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    corpus = _corpus(args.corpus_files)
    full_below = disclosure.DEFAULT_FULL_BELOW_TOKENS
    results["outline_share"] = {lang: _outline_share(files, full_below) for lang, files in corpus.items()}

    pg = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    dbname = f"exai_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    dsn = _with_db(pg, dbname)
    home = Path(tempfile.mkdtemp(prefix="exai-bench-disclosure-"))
    roots = home / "project"
    roots.mkdir()
    try:
        await migrate(dsn)
        with FakeProvider().running() as fake:
            inst = _instance(dsn, redis_url, fake, home, roots)
            try:
                files = _pick_files(corpus["python"], roots)
                results["thread_tokens"] = await _thread_tokens(inst, fake, files)
                results["notes_recall"] = await _notes_recall(inst, fake)
                results["leaks"] = await _leaks(inst, fake)
            finally:
                inst.stop()
    finally:
        admin = await asyncpg.connect(pg)
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(home, ignore_errors=True)
    results["meta"] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token_counter": "splintr-rs (instance/context/tokens.py)",
        "full_below_tokens": full_below,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    _print(results)
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"disclosure-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {path.relative_to(ROOT)}")
    ok = (
        (results["outline_share"]["python"]["aggregate_share"] or 1) <= 0.10
        and results["notes_recall"]["recall"] == 1.0
        and results["notes_recall"]["recall_after_compaction"] == 1.0
        and results["leaks"]["leaks_or_misses"] == 0
    )
    return 0 if ok else 1


def _print(r: dict[str, Any]) -> None:
    print("outline share (outline block tokens / file tokens, files sent as outlines)")
    for lang, o in r["outline_share"].items():
        print(
            f"  {lang:9} files={o['files_outlined']:4} (+{o['files_sent_whole']} small, sent whole)  "
            f"aggregate={o['aggregate_share']}  median={o['median_share']}  p90={o['p90_share']}  "
            f"<=10%: {o['files_at_or_under_10pct']}"
        )
    t = r["thread_tokens"]
    print(f"thread of {t['stored_turns']} turns, {t['files']} files ({t['file_tokens_per_call']} tokens)")
    print(f"  tokens sent with disclosure:    {t['tokens_sent_with_disclosure']}")
    print(f"  tokens sent without disclosure: {t['tokens_sent_without_disclosure']}")
    print(f"  ratio with/without: {t['ratio_with_over_without']}")
    n = r["notes_recall"]
    print(
        f"notes after restart: {n['in_prompt_after_restart']}/{n['notes']} in the prompt, "
        f"recall {n['recall']}"
    )
    print(f"  ({n['captured_automatically']} of them captured automatically)")
    print(
        f"notes after compaction: {n['in_prompt_after_compaction']}/{n['notes']} in the prompt, "
        f"recall {n['recall_after_compaction']} (history {n['compaction']})"
    )
    lk = r["leaks"]
    print(f"cross-scope: {lk['checks']} checks, {lk['sessions']} sessions x 2 threads")
    print(f"  leaks or misses: {lk['leaks_or_misses']}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
