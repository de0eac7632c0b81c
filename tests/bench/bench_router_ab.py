"""Two router builds side by side in one sitting: A (a base commit, default `main`) and B (this tree).

    python tests/bench/bench_router_ab.py [--base main] [--rounds 3] [--calls 300]

Starts one fleet (tests/fleet.py: five instances under supervisord, from this tree), then two
extra `exai-router` processes on their own ports against the same Redis: A runs the code of
`--base` (exported with `git archive` into a temporary folder), B runs this tree's. Both share
the session table, so every session is opened once and then called through A, through B,
through nginx (when /usr/sbin/nginx exists) and straight to its instance, interleaved call by
call on the same instance. Per round and era (2026-07-28 JSON answers; handshake era, SSE
answers) at 1 and 5 sessions: each router's CPU per call (from /proc) and added p50 over
direct; then calls/s at 32 and 64 clients through A, B and direct (order alternated by round).
`--parts first`: a new 2026-07-28 session's first call against its second, through A and B
alternately (every session ended before the next opens, so a free instance waits each time):
added p50, each router's own time and its wait on the instance (its stage histogram). The
instances run this tree's code for both, so this compares the routers only.

Prints each round and the medians over rounds, with B/A ratios, and saves JSON to
tests/bench/results/router-ab-<timestamp>.json. The machine's load average is recorded: the
numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import protocol as p  # noqa: E402
from tests.bench.bench_router import (  # noqa: E402
    Caller,
    HandshakeCaller,
    Nginx,
    _cpu_seconds,
    _num,
    _stage_sums,
    _stats,
    _status,
    direct_caller,
    direct_headers,
    drop_scratch_database,
    fake_provider_overrides,
    scratch_database,
)
from tests.fakes.provider import Behaviour, FakeProvider  # noqa: E402
from tests.fleet import BENCH_SETTINGS, Fleet, run_bench  # noqa: E402
from tests.ports import free_port  # noqa: E402

_LAUNCH = (
    "import sys; sys.path.insert(0, sys.argv[1]); import router; "
    "print('router code from', router.__file__, flush=True); "
    "from router.main import main; sys.exit(main())"
)


class Build:
    """One router build, run as an extra router of the fleet from the code in `src`."""

    def __init__(self, name: str, fleet: Fleet, src: Path) -> None:
        self.name, self.fleet, self.src = name, fleet, src
        self.port = free_port()
        self.log_path = fleet.settings.state_dir / "logs" / f"router-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.idle_cpu_per_s = 0.0  # CPU seconds per second with no calls (housekeeping)

    async def measure_idle(self, seconds: float) -> None:
        c0, t0 = self.cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        self.idle_cpu_per_s = (self.cpu() - c0) / (time.monotonic() - t0)

    @property
    def url(self) -> str:
        return f"http://{self.fleet.settings.router_host}:{self.port}"

    @property
    def mcp_url(self) -> str:
        return self.url + p.MCP_PATH

    def start(self) -> None:
        env = {
            **self.fleet.environment(),
            "EXAI_ROUTER_PORT": str(self.port),
            "EXAI_INTERNAL_TOKEN": self.fleet.internal_token,
            "EXAI_ADMIN_TOKEN": self.fleet.admin_token,
            "EXAI_LOG_LEVEL": "WARNING",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(self.src)],
                env=env,
                cwd=self.src,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router {self.name} exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {self.name} did not answer")
            time.sleep(0.2)
        first = self.log_path.read_text().splitlines()[0]
        if str(self.src) not in first:
            raise RuntimeError(f"router {self.name} runs the wrong code: {first}")

    def cpu(self) -> float:
        assert self.proc is not None
        return _cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"router {self.name} did not stop within 30 s of SIGTERM; killed", flush=True)
                self.proc.kill()
                self.proc.wait()


def _twin(c: Caller | HandshakeCaller, url: str) -> Caller | HandshakeCaller:
    """A caller for the same session through another router."""
    if isinstance(c, Caller):
        return Caller(url, c.client)
    twin = HandshakeCaller(url, c.client)
    twin.session = c.session
    twin.headers.update({p.MCP_SESSION_ID: c.session, p.MCP_PROTOCOL_VERSION: "2025-11-25"})
    return twin


async def _overhead(
    fleet: Fleet, builds: list[Build], sessions: int, calls: int, era: str, nginx: Nginx | None
) -> dict[str, Any]:
    """Each session calls through every router, nginx and direct in turn, sessions concurrently."""
    paths: list[dict[str, Caller | HandshakeCaller]] = []
    for i in range(sessions):
        client = f"ab-{era}-{sessions}-{i}-{secrets.token_hex(2)}"
        first: Caller | HandshakeCaller
        if era == "stateless":
            first = Caller(builds[0].mcp_url, client)
        else:
            first = HandshakeCaller(builds[0].mcp_url, client)
            await first.open()
        await first.call("version", {})
        status = await _status(first)
        num = _num(status["instance_id"])
        row: dict[str, Caller | HandshakeCaller] = {builds[0].name: first}
        for b in builds[1:]:
            row[b.name] = _twin(first, b.mcp_url)
        extra = direct_headers(fleet, status["session"], era, client)
        urls = {"direct": f"http://127.0.0.1:{fleet.instance_port(num)}/mcp"}
        if nginx is not None:
            urls["nginx"] = f"http://127.0.0.1:{nginx.ports[num]}/mcp"
        for name, url in urls.items():
            c: Caller | HandshakeCaller
            if era == "stateless":
                c = Caller(url, client, extra)
            else:
                c = HandshakeCaller(url, client, extra)
                await c.open()
            row[name] = c
        paths.append(row)
    names = list(paths[0])
    samples: dict[str, list[float]] = {n: [] for n in names}

    async def run(row: dict[str, Caller | HandshakeCaller], order: int) -> None:
        for _ in range(20):  # warm every path
            for c in row.values():
                await c.call("version", {})
        for k in range(calls):
            # rotate the order so no path always follows the same one
            shift = (k + order) % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(await row[name].call("version", {}))

    cpu0 = {b.name: b.cpu() for b in builds}
    nginx0 = nginx.worker_cpu() if nginx is not None else 0.0
    t0 = time.monotonic()
    await asyncio.gather(*(run(row, i) for i, row in enumerate(paths)))
    elapsed = time.monotonic() - t0
    per_call = (calls + 20) * sessions
    cpu = {b.name: (b.cpu() - cpu0[b.name]) * 1000 / per_call for b in builds}
    # the same minus what the router burns with no calls at all (its housekeeping timers)
    net = {b.name: cpu[b.name] - b.idle_cpu_per_s * elapsed * 1000 / per_call for b in builds}
    if nginx is not None:
        cpu["nginx"] = (nginx.worker_cpu() - nginx0) * 1000 / per_call
    for row in paths:
        for name, c in row.items():
            if name == builds[0].name or name in ("direct", "nginx"):
                await c.close()
            else:
                await c.http.close()  # the twin shares its session: no DELETE
    stats = {n: _stats(s) for n, s in samples.items()}
    direct = stats["direct"]["p50_ms"]
    return {
        "era": era,
        "sessions": sessions,
        "p50_ms": {n: s["p50_ms"] for n, s in stats.items()},
        "added_p50_ms": {n: round(s["p50_ms"] - direct, 3) for n, s in stats.items() if n != "direct"},
        "cpu_ms_per_call": {n: round(v, 3) for n, v in cpu.items()},
        "net_cpu_ms_per_call": {n: round(v, 3) for n, v in net.items()},
    }


async def _rate(
    fleet: Fleet, builds: list[Build], clients: int, seconds: float, flip: bool
) -> dict[str, Any]:
    anchors = [Caller(builds[0].mcp_url, f"abrate-{i}-{secrets.token_hex(2)}") for i in range(5)]
    bound = []
    for a in anchors:
        await a.call("version", {})
        bound.append(await _status(a))
        for b in builds[1:]:  # every router learns the session before the burst
            twin = _twin(a, b.mcp_url)
            await twin.call("version", {})
            await twin.http.close()

    async def measure(target: str) -> float:
        callers: list[Caller] = []
        for i in range(clients):
            st, client = bound[i % 5], anchors[i % 5].client
            if target == "direct":
                callers.append(direct_caller(fleet, st, client))
            else:
                build = next(b for b in builds if b.name == target)
                callers.append(Caller(build.mcp_url, client))
        done = 0
        stop = time.monotonic() + seconds

        async def run(c: Caller) -> None:
            nonlocal done
            while time.monotonic() < stop:
                with contextlib.suppress(RuntimeError):
                    await c.call("version", {})
                    done += 1

        await asyncio.gather(*(run(c) for c in callers))
        for c in callers:
            await c.http.close()
        return round(done / seconds, 1)

    order = [b.name for b in builds] + ["direct"]
    if flip:
        order.reverse()
    out = {name: await measure(name) for name in order}
    for a in anchors:
        await a.close()
    return {"clients": clients, "calls_per_s": out}


async def _first(fleet: Fleet, builds: list[Build], samples: int, flip: bool) -> dict[str, Any]:
    """A new session's first call vs its second, through each build in turn (see the module doc)."""
    keys = ("first", "bound", "own_first", "own_bound", "inst_first", "inst_bound")
    got: dict[str, dict[str, list[float]]] = {b.name: {k: [] for k in keys} for b in builds}
    for i in range(samples):
        for b in builds[::-1] if (i + flip) % 2 else builds:
            row = got[b.name]
            c = Caller(b.mcp_url, f"ab-first-{b.name}-{i}-{secrets.token_hex(2)}")
            async with c.http.get(b.url + "/healthz") as r:  # the client's own connect: untimed
                await r.read()
            s0 = await _stage_sums(fleet, b.url)
            row["first"].append(await c.call("version", {}))
            s1 = await _stage_sums(fleet, b.url)
            row["bound"].append(await c.call("version", {}))
            s2 = await _stage_sums(fleet, b.url)
            row["own_first"].append(s1[0] - s0[0])
            row["own_bound"].append(s2[0] - s1[0])
            row["inst_first"].append(s1[1] - s0[1])
            row["inst_bound"].append(s2[1] - s1[1])
            await c.close()
            status, body = await fleet.admin("GET", "/admin/sessions", router_url=b.url)
            for sess in body["sessions"] if status == 200 else ():
                await fleet.admin("DELETE", f"/admin/sessions/{sess['id']}", router_url=b.url)
    out: dict[str, Any] = {}
    for name, row in got.items():
        p50 = {k: _stats(v)["p50_ms"] for k, v in row.items()}
        out[name] = {
            **{f"{k}_p50_ms": v for k, v in p50.items()},
            "added_p50_ms": round(p50["first"] - p50["bound"], 3),
        }
    return out


def _first_line(r: dict[str, Any]) -> str:
    return "first call: " + "  |  ".join(
        f"{n}: added {v['added_p50_ms']:+.3f} (first {v['first_p50_ms']:.3f} bound {v['bound_p50_ms']:.3f}), "
        f"own {v['own_first_p50_ms']:.3f} vs {v['own_bound_p50_ms']:.3f}, "
        f"instance {v['inst_first_p50_ms']:.3f} vs {v['inst_bound_p50_ms']:.3f}"
        for n, v in r.items()
    )


def _export(base: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", base], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _median(rounds: list[dict[str, Any]], key: str, name: str) -> float:
    return round(statistics.median(r[key][name] for r in rounds), 3)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="git revision for build A (default: main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=300, help="version calls per session, path and round")
    ap.add_argument("--rate-seconds", type=float, default=6.0)
    ap.add_argument("--parts", default="overhead,rate", help="overhead,rate,first")
    ap.add_argument("--first-samples", type=int, default=40, help="new sessions per build and round")
    ap.add_argument("--eras", default="stateless,handshake", help="stateless,handshake")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU measurement")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    pg = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    dsn = await scratch_database(pg, "exai_benchab")
    state = Path(os.environ.get("TMPDIR", "/tmp")) / f"exai-benchab-{secrets.token_hex(4)}"
    state.mkdir(parents=True)
    load0 = os.getloadavg()
    results: dict[str, Any] = {"rounds": []}
    with (
        tempfile.TemporaryDirectory(prefix="exai-ab-base-") as tmp,
        FakeProvider(default=Behaviour(delay=0.2)).running() as provider,
    ):
        fleet = Fleet(
            state,
            database_url=dsn,
            redis_url=redis_url,
            redis_prefix=f"exaiab{secrets.token_hex(3)}",
            instances=5,
            max_instances=5,
            overrides={**BENCH_SETTINGS, **fake_provider_overrides(provider)},
        )
        builds = [Build("A", fleet, _export(args.base, Path(tmp))), Build("B", fleet, ROOT)]
        try:
            await asyncio.to_thread(fleet.start)
            await fleet.wait_instances(5)
            for b in builds:
                await asyncio.to_thread(b.start)
            await asyncio.sleep(2)
            await asyncio.gather(*(b.measure_idle(args.idle_seconds) for b in builds))
            results["idle_cpu_ms_per_s"] = {b.name: round(b.idle_cpu_per_s * 1000, 2) for b in builds}
            print(f"idle CPU ms/s: {results['idle_cpu_ms_per_s']}", flush=True)
            async with contextlib.AsyncExitStack() as stack:
                nginx = None
                if Nginx.BIN.exists() and "overhead" in parts:
                    nginx = await stack.enter_async_context(Nginx(state, fleet, 5))
                for rnd in range(args.rounds):
                    row: dict[str, Any] = {"round": rnd + 1, "overhead": [], "rate": []}
                    if "first" in parts:
                        await fleet.end_all_sessions()
                        row["first"] = await _first(fleet, builds, args.first_samples, flip=bool(rnd % 2))
                        print(_first_line(row["first"]), flush=True)
                    if "overhead" in parts:
                        for era in args.eras.split(","):
                            for n in (1, 5):
                                r = await _overhead(fleet, builds, n, args.calls, era, nginx)
                                row["overhead"].append(r)
                                print(_line(r), flush=True)
                                await fleet.end_all_sessions()
                    if "rate" in parts:
                        for n in (32, 64):
                            r = await _rate(fleet, builds, n, args.rate_seconds, flip=bool(rnd % 2))
                            row["rate"].append(r)
                            print(f"rate {n:>3} clients: {r['calls_per_s']}", flush=True)
                            await fleet.end_all_sessions()
                    results["rounds"].append(row)
        finally:
            for b in builds:
                b.stop()
            await asyncio.to_thread(fleet.stop)
            await drop_scratch_database(pg, dsn)
    results["summary"] = _summary(results["rounds"])
    results["meta"] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base": args.base,
        "rounds": args.rounds,
        "calls": args.calls,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    _print(results)
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"router-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT)}")
    return 0


def _line(r: dict[str, Any]) -> str:
    cpu = " ".join(f"{k}={v:.3f}" for k, v in r["cpu_ms_per_call"].items())
    net = " ".join(f"{k}={v:.3f}" for k, v in r["net_cpu_ms_per_call"].items())
    added = " ".join(f"{k}={v:+.3f}" for k, v in r["added_p50_ms"].items())
    return f"{r['era']:>9} x{r['sessions']}: added p50 ms {added} | cpu ms/call {cpu} (net of idle: {net})"


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rounds and rounds[0]["overhead"]:
        for i, first in enumerate(rounds[0]["overhead"]):
            rs = [r["overhead"][i] for r in rounds]
            key = f"{first['era']}_{first['sessions']}"
            out[key] = {
                "cpu_ms_per_call": {n: _median(rs, "cpu_ms_per_call", n) for n in first["cpu_ms_per_call"]},
                "net_cpu_ms_per_call": {n: _median(rs, "net_cpu_ms_per_call", n) for n in ("A", "B")},
                "added_p50_ms": {n: _median(rs, "added_p50_ms", n) for n in first["added_p50_ms"]},
                "direct_p50_ms": _median(rs, "p50_ms", "direct"),
            }
    if rounds and "first" in rounds[0]:
        out["first"] = {
            name: {k: round(statistics.median(r["first"][name][k] for r in rounds), 3) for k in first}
            for name, first in rounds[0]["first"].items()
        }
    if rounds and rounds[0]["rate"]:
        for i, first in enumerate(rounds[0]["rate"]):
            rs = [r["rate"][i] for r in rounds]
            out[f"rate_{first['clients']}"] = {n: _median(rs, "calls_per_s", n) for n in first["calls_per_s"]}
    return out


def _print(results: dict[str, Any]) -> None:
    s, meta = results["summary"], results["meta"]
    print(f"\nmedians over {meta['rounds']} rounds (A = {meta['base']}, B = this tree)")
    print(f"load average before {meta['loadavg_before']}, after {meta['loadavg_after']}")
    print(f"idle CPU ms/s: {results.get('idle_cpu_ms_per_s')}")
    heads = ("cpu A", "cpu B", "B/A", "net A", "net B", "cpu ngx", "add A", "add B", "add ngx")
    print(f"{'':>13} " + " ".join(f"{h:>7}" for h in heads))
    nan = float("nan")
    if "first" in s:
        print(_first_line(s["first"]))
    for key, v in s.items():
        if key.startswith("rate_") or key == "first":
            continue
        cpu, net, add = v["cpu_ms_per_call"], v["net_cpu_ms_per_call"], v["added_p50_ms"]
        ratio = cpu["B"] / cpu["A"] if cpu["A"] else nan
        cells = (cpu["A"], cpu["B"], ratio, net["A"], net["B"], cpu.get("nginx", nan))
        adds = (add["A"], add["B"], add.get("nginx", nan))
        row = " ".join(f"{c:>7.3f}" for c in cells) + " " + " ".join(f"{a:>+7.3f}" for a in adds)
        print(f"{key:>13} {row}")
    for key, v in s.items():
        if key.startswith("rate_"):
            d = v["direct"] or 1.0
            print(
                f"{key:>13} calls/s A {v['A']:.0f} ({v['A'] / d:.0%} of direct)  "
                f"B {v['B']:.0f} ({v['B'] / d:.0%})  direct {v['direct']:.0f}"
            )


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
