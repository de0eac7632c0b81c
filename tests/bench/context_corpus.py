"""Generate long agent threads with planted facts, for bench_context.py and the context tests.

    python tests/bench/context_corpus.py --threads 12 --seed 7 > corpus.json

A thread looks like a coding agent consulting a model: task statements, pasted logs, stack
traces and tool output, code blocks, long explanations, small talk, and, scattered through the
older turns, facts that a later turn would need. Each fact has a kind (decision, correction,
constraint, error_fix, file_ref, open_question), a `needle` (the exact string that must still be
in the prompt for the fact to count as kept) and `critical` (decisions, corrections,
constraints and error fixes are). Every kind has many phrasings, picked at random, and the
filler mentions files, numbers and errors too, so a scorer cannot win by spotting digits.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import asdict, dataclass, field
from typing import Any

CRITICAL = {"decision", "correction", "constraint", "error_fix"}

_MODULES = [
    "billing",
    "ingest",
    "router",
    "scheduler",
    "auth",
    "cache",
    "export",
    "search",
    "notify",
    "ledger",
]
_NOUNS = ["queue", "pool", "worker", "index", "session", "lease", "token", "snapshot", "batch", "retry"]
_LIBS = [
    "asyncpg",
    "httpx",
    "redis",
    "pydantic",
    "uvicorn",
    "sqlalchemy",
    "celery",
    "boto3",
    "grpcio",
    "orjson",
]


@dataclass
class Fact:
    kind: str
    needle: str
    turn: int
    critical: bool
    text: str


@dataclass
class Thread:
    id: str
    turns: list[dict[str, str]] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)


def _ident(rng: random.Random) -> str:
    return f"{rng.choice(_MODULES)}_{rng.choice(_NOUNS)}_{rng.randint(10, 99)}"


def _file(rng: random.Random) -> str:
    root = rng.choice(["src", "app", "lib", "services"])
    ext = rng.choice([".py", ".ts", ".go"])
    return f"{root}/{rng.choice(_MODULES)}/{rng.choice(_NOUNS)}_{rng.randint(2, 9)}{ext}"


def _code(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(2)) + "-" + str(rng.randint(1000, 9999))


def _fact(kind: str, rng: random.Random) -> tuple[str, str]:
    """(sentence(s), needle) in one of many phrasings."""
    n = rng.randint(11, 97)
    ident, path, code = _ident(rng), _file(rng), _code(rng)
    lib = rng.choice(_LIBS)
    if kind == "decision":
        needle = ident
        forms = [
            f"OK, final call: we go with `{ident}` as the single entry point and drop the old adapter.",
            f"After weighing both, I'd pick {ident} over the hand-rolled version; let's lock that in.",
            f"Team agreed this morning that {ident} replaces the two legacy paths.",
            f"So the plan is settled — {ident} becomes the default from now on.",
            f"We're standardising on {ident}; the alternative is off the table.",
            f"Decision recorded: {ident} it is, the other prototype gets deleted.",
            f"Let's commit to {ident} for this release rather than keep both around.",
        ]
    elif kind == "correction":
        needle = f"{n * 100}"
        wrong = n * 100 + rng.choice([50, 200, 1000])
        forms = [
            f"No wait, I gave you the wrong number earlier: the limit is {n * 100}, not {wrong}.",
            f"Correction — it's {n * 100} requests per minute, I misremembered {wrong}.",
            f"Scratch what I said about {wrong}; the real figure from the dashboard is {n * 100}.",
            f"Sorry, that was a typo on my side. Use {n * 100} instead of {wrong}.",
            f"Actually the quota is {n * 100}. The {wrong} I mentioned was last year's setting.",
            f"Hmm, I mixed things up: {n * 100} is right, {wrong} was the staging value.",
        ]
    elif kind == "constraint":
        needle = f"{lib}"
        forms = [
            f"Hard requirement from ops: nothing in this service may import {lib} directly.",
            f"Keep in mind we are not allowed to upgrade {lib} past the pinned version this quarter.",
            f"Whatever we do, {lib} has to stay out of the request path — compliance insists.",
            f"The rule is simple: no new dependency on {lib}, the security review blocks it.",
            f"Please make sure the patch never touches the {lib} configuration; another team owns it.",
            f"One boundary: {lib} must only be called from the worker, never from the API tier.",
        ]
    elif kind == "error_fix":
        needle = code
        forms = [
            f"The crash was error {code} from the payment gateway; it went away once we retried "
            "with a fresh idempotency key.",
            f"Root cause of {code}: the connection was reused after the pool closed it. "
            "Recreating the client per worker fixed it.",
            f"We kept hitting {code} in CI, turned out the fixture leaked a transaction; "
            "wrapping it in a savepoint solved it.",
            f"{code} showed up again under load. Raising the read deadline to {n} seconds made it disappear.",
            f"The {code} failures came from clock skew on the runner, so we now sync time before the suite.",
            f"Fixed {code}: the migration ran before the role existed, reordering the scripts resolved it.",
        ]
    elif kind == "file_ref":
        needle = path
        forms = [
            f"The retry logic lives in {path}, around the middle of the file.",
            f"Have a look at {path} — that's where the timeout is set.",
            f"Everything related to the export format is in {path}.",
            f"I moved the helper to {path} so both services can share it.",
        ]
    else:  # open_question
        needle = ident
        forms = [
            f"Still unclear: should {ident} be per tenant or global?",
            f"Open point for later — who owns {ident} once the migration is done?",
            f"Do we even need {ident} if the cache is warm?",
            f"Nobody answered yet whether {ident} must survive a restart.",
        ]
    return rng.choice(forms), needle


def _fact_alt(kind: str, rng: random.Random) -> tuple[str, str]:
    """A second, disjoint set of phrasings (plainer, fewer cue words), to test generalisation."""
    n = rng.randint(11, 97)
    ident, path, code = _ident(rng), _file(rng), _code(rng)
    tech = rng.choice(["Postgres", "Kafka", "SQLite", "NATS", "Envoy", "Terraform", "Celery", "Nginx"])
    if kind == "decision":
        needle = ident
        forms = [
            f"Going forward {ident} is how we do it.",
            f"{ident} wins, the other branch can be closed.",
            f"Ship it with {ident}.",
            f"My vote and the team's: {ident}.",
            f"From here on the importer talks to {ident} and nothing else.",
        ]
    elif kind == "correction":
        needle = f"{n * 100}"
        forms = [
            f"Ignore the figure from before, the right one is {n * 100}.",
            f"Small fix to what I told you: {n * 100} per minute.",
            f"That number was off by a bit, it should read {n * 100}.",
            f"Hmm, let me restate it: {n * 100} is the ceiling.",
        ]
    elif kind == "constraint":
        needle = tech
        forms = [
            f"{tech} stays frozen until the audit ends.",
            f"Under no circumstances do we bring {tech} into this repo.",
            f"{tech} is off-limits for the billing code.",
            f"Legal said the EU data can't go through {tech}.",
        ]
    elif kind == "error_fix":
        needle = code
        forms = [
            f"{code} kept biting us; swapping the driver made it go away.",
            f"The {code} alarms stopped after we pinned the image.",
            f"It was the proxy all along behind {code} — bypassing it cleared things up.",
            f"{code} again, same story: a stale DNS entry, flushing it sorted it out.",
        ]
    elif kind == "file_ref":
        needle = path
        forms = [f"Check {path}.", f"It's all in {path}.", f"See {path} for the wiring."]
    else:
        needle = ident
        forms = [
            f"Who decides on {ident}?",
            f"{ident}: per tenant, or one for everybody?",
            f"Not sure yet what happens to {ident} after the cut-over.",
        ]
    return rng.choice(forms), needle


_FILLER = [
    "That makes sense to me.",
    "Let me think about this for a second.",
    "There are a few ways to approach this, each with trade-offs.",
    "In general, async code is easier to reason about when each task owns its resources.",
    "The tests look reasonable overall, although the naming could be more consistent.",
    "I would also consider how this behaves when the network is slow.",
    "Logging at the boundaries usually pays off when something goes wrong in production.",
    "This pattern is common in services that talk to several databases.",
    "It might be worth writing a small benchmark before optimising further.",
    "Readability matters more than cleverness here.",
    "Good question, and the answer depends on the workload.",
    "I looked through the module again and nothing else stands out.",
    "Thanks, that helps a lot.",
    "Sure, happy to dig into it.",
    "We could also revisit this after the release.",
    "The documentation for that library is a bit thin, unfortunately.",
    "Most of the time spent is in serialisation, which is expected.",
    "Keep the functions small and the data flow obvious.",
    "Here is roughly how I would structure it.",
    "Let me know if you want me to go deeper on any part.",
    "Overall the design is sound; the remaining issues are details.",
    "I ran the suite locally and it took about {n} seconds.",
    "The old dashboard showed {n} requests in the last hour, which is normal.",
    "There is a similar helper in {path} but it is unused.",
    "Version {v} of the client changed a default, which is worth knowing.",
    "An error like this usually means the service restarted mid-request.",
    "We saw timeouts last month too, but they were caused by a noisy neighbour.",
    "The constant {const} is only used in tests.",
    "The staging cluster has {n} nodes at the moment.",
    "I'd avoid premature abstraction until the second use case shows up.",
]


_SUBJECTS = [
    "The handler",
    "This approach",
    "The current setup",
    "That module",
    "The test suite",
    "Our client code",
    "The background job",
    "The config loader",
    "The deployment script",
    "The retry wrapper",
    "The API layer",
]
_PREDICATES = [
    "is probably fine for now",
    "could be simplified a little",
    "reads better after the refactor",
    "has grown over time",
    "looks similar to what other teams do",
    "might need a second look later",
    "was written before the current conventions",
    "behaves as expected in my runs",
    "does a bit more work than it needs to",
    "is covered by the integration tests",
    "would benefit from clearer names",
    "works, but the error messages are vague",
]
_TAILS = [
    "",
    " in most cases",
    ", at least in staging",
    ", as far as I can tell",
    " once the data is warm",
    " when traffic is low",
    ", which is reassuring",
    ", though I have not profiled it",
]


def _filler(rng: random.Random, k: int) -> str:
    out = []
    for _ in range(k):
        if rng.random() < 0.6:
            out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_PREDICATES)}{rng.choice(_TAILS)}.")
            continue
        s = rng.choice(_FILLER)
        out.append(
            s.format(
                n=rng.randint(2, 900),
                path=_file(rng),
                v=f"{rng.randint(1, 5)}.{rng.randint(0, 20)}",
                const=_ident(rng).upper(),
            )
        )
    return " ".join(out)


def _log(rng: random.Random) -> str:
    lines = []
    for i in range(rng.randint(12, 40)):
        lvl = rng.choice(["INFO", "INFO", "DEBUG", "WARN", "INFO", "ERROR"])
        when = f"2026-03-{rng.randint(10, 28)} 12:{i % 60:02d}:{rng.randint(0, 59):02d}"
        where = f"{rng.choice(_MODULES)}.{rng.choice(_NOUNS)}"
        status = rng.choice([200, 200, 204, 500, 503])
        took = f"elapsed={rng.randint(1, 900)}ms"
        lines.append(f"{when} {lvl} {where} id={rng.randint(1000, 99999)} {took} status={status}")
    return "\n".join(lines)


def _trace(rng: random.Random) -> str:
    frames = []
    for _ in range(rng.randint(4, 10)):
        where = f"/srv/app/{rng.choice(_MODULES)}/{rng.choice(_NOUNS)}.py"
        func = f"{rng.choice(_NOUNS)}_{rng.choice(['run', 'get', 'put', 'flush'])}"
        code = rng.choice(["await self._send(batch)", "return conn.execute(q)", "data = json.loads(raw)"])
        frames.append(f'  File "{where}", line {rng.randint(10, 900)}, in {func}\n    {code}')
    exc = rng.choice(["TimeoutError", "KeyError", "ConnectionResetError"])
    return (
        "Traceback (most recent call last):\n"
        + "\n".join(frames)
        + f"\n{exc}: {rng.choice(['timed out', 'peer closed'])}"
    )


def _codeblock(rng: random.Random) -> str:
    name = _ident(rng)
    rhs = ["await fetch(item)", "acc + 1", "cfg.get(name)", "None"]
    body = "\n".join(
        f"    {rng.choice(['x', 'y', 'acc', 'item'])} = {rng.choice(rhs)}" for _ in range(rng.randint(6, 24))
    )
    return f"```python\nasync def {name}(cfg, items):\n{body}\n    return acc\n```"


def _fact_plain(kind: str, rng: random.Random) -> tuple[str, str]:
    """Held-out phrasings written after the scorer was tuned: few identifiers, plain words."""
    day = rng.choice(["Tuesday", "Thursday", "Friday", "Monday"])
    other = rng.choice([d for d in ("Tuesday", "Thursday", "Friday", "Monday") if d != day])
    thing = rng.choice(
        ["blue-green rollout", "canary release", "nightly rebuild", "read replica", "feature flag"]
    )
    pkg = rng.choice(["pkg/parse/lexer.go", "cmd/agent/main.go", "web/src/routes.tsx", "api/v2/handlers.py"])
    if kind == "decision":
        return rng.choice(
            [
                f"For the launch we will do a {thing}, that was the outcome of the review.",
                f"Fine, the {thing} it is.",
                f"Both options were discussed and the {thing} came out ahead.",
            ]
        ), thing
    if kind == "correction":
        return rng.choice(
            [
                f"I said {other} but the freeze really starts on {day}.",
                f"Not {other} — {day}. My calendar was wrong.",
            ]
        ), day
    if kind == "constraint":
        return rng.choice(
            [
                f"Downtime while the {thing} runs is not acceptable for the customers in Asia.",
                f"We get exactly one maintenance window for the {thing}, on {day} night.",
            ]
        ), thing
    if kind == "error_fix":
        return rng.choice(
            [
                "The upload test was flaky because two tests shared the temp dir; "
                f"giving each its own dir for the {thing} fixed it.",
                f"Memory kept climbing during the {thing} until we closed the cursor after each page.",
            ]
        ), thing
    if kind == "file_ref":
        return f"The code that matters here is {pkg}.", pkg
    return rng.choice(
        [f"Should the {thing} be rolled back automatically?", f"Who signs off on the {thing}?"]
    ), thing


def make_thread(seed: int, turns: int = 36, phrasing: str = "main") -> Thread:
    rng = random.Random(seed)
    th = Thread(id=f"t{seed}")
    kinds = ["decision", "correction", "constraint", "error_fix", "file_ref", "open_question"]
    # facts go in the older 75 % of the thread, about one per two turns
    plant_at = sorted(rng.sample(range(1, int(turns * 0.75)), k=min(int(turns * 0.75) - 1, turns // 2)))
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        parts: list[str] = []
        if role == "user":
            parts.append(_filler(rng, rng.randint(1, 3)))
            r = rng.random()
            if r < 0.35:
                parts.append("Here is the output I get:\n\n" + _log(rng))
            elif r < 0.55:
                parts.append(_trace(rng))
        else:
            parts.append(_filler(rng, rng.randint(4, 10)))
            if rng.random() < 0.45:
                parts.append(_codeblock(rng))
            parts.append(_filler(rng, rng.randint(2, 6)))
        if t in plant_at:
            kind = rng.choice(kinds)
            if kind == "correction" and role != "user":
                kind = "decision"
            maker = {"alt": _fact_alt, "plain": _fact_plain}.get(phrasing, _fact)
            text, needle = maker(kind, rng)
            pos = rng.randint(0, len(parts))
            parts.insert(pos, text)
            th.facts.append(Fact(kind, needle, t, kind in CRITICAL, text))
        th.turns.append({"role": role, "content": "\n\n".join(parts)})
    return th


def make_corpus(n: int = 12, seed: int = 7, turns: int = 36, phrasing: str = "main") -> list[Thread]:
    return [make_thread(seed * 1000 + i, turns, phrasing) for i in range(n)]


def load_corpus(path: str) -> list[Thread]:
    """A corpus saved by `main` (or written by hand in the same JSON shape)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [
        Thread(id=str(t["id"]), turns=list(t["turns"]), facts=[Fact(**f) for f in t.get("facts", [])])
        for t in data
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--turns", type=int, default=36)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--phrasing", choices=["main", "alt", "plain"], default="main")
    args = ap.parse_args()
    threads = make_corpus(args.threads, args.seed, args.turns, args.phrasing)
    corpus: list[dict[str, Any]] = [asdict(t) for t in threads]
    print(json.dumps(corpus, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
