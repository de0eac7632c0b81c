"""The soak run's command line; see tests/soak/__init__.py and the README ("Soak run")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.fleet import Fleet
from tests.ports import free_port
from tests.soak import acks as ack_check
from tests.soak import report as rep
from tests.soak.acks import AckLog
from tests.soak.mix import Actor, CallLog, RealisticProvider, Shared, TerminationFailures, parse_mix
from tests.soak.probes import Probe
from tests.soak.services import (
    DEFAULT_FAULTS,
    FAULT_GRACE,
    OwnRedis,
    parse_duration,
    parse_faults,
    pg_proxy,
    postgres,
    proxied,
    run_schedule,
    wall,
)
from tests.soak.verdict import judge

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "soak" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tests.soak", description="Soak a real fleet; judge and plot the run."
    )
    ap.add_argument("--duration", default="1h", help="load time: 90s, 2m, 1h (default 1h)")
    ap.add_argument(
        "--warmup", default=None, help="ignored by the slope tests (default: 20%% of the run, at most 10m)"
    )
    ap.add_argument("--interval", default="5s", help="sampling interval (default 5s)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client actors (default 4)")
    ap.add_argument("--instances", type=int, default=4, help="instances started (default 4)")
    ap.add_argument("--max-instances", type=int, default=8, help="instances provisioned (default 8)")
    ap.add_argument(
        "--mix", default=None, help="scenario weights, e.g. chat=4,tasks=2 (default: mix.DEFAULT_MIX)"
    )
    ap.add_argument("--handshake-share", type=float, default=0.5, help="share of handshake-era sessions")
    ap.add_argument("--abandon-share", type=float, default=0.1, help="share of sessions never ended")
    ap.add_argument("--think", type=float, default=1.0, help="scale of think times between calls")
    ap.add_argument(
        "--idle-timeout", default="30s", help="EXAI_SESSION_IDLE_TIMEOUT of the fleet (default 30s)"
    )
    ap.add_argument(
        "--faults", default=DEFAULT_FAULTS, help=f"fault schedule or 'none' (default {DEFAULT_FAULTS})"
    )
    ap.add_argument(
        "--leak-bytes",
        type=int,
        default=0,
        help="EXAI_TEST_LEAK_PER_CALL_BYTES (test only: the soak must fail)",
    )
    ap.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for JSON and PNG (default tests/soak/results)"
    )
    ap.add_argument("--name", default=None, help="file stem (default soak-<UTC time>)")
    ap.add_argument("--seed", type=int, default=None, help="random seed")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (state, logs, acks.jsonl)")
    ap.add_argument("--report", type=Path, default=None, help="judge and plot a saved JSON again; no run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        report = dict(json.loads(args.report.read_text()))
        return finish(report, args.report.with_suffix(""))
    return asyncio.run(soak(args))


def finish(report: dict[str, Any], stem: Path) -> int:
    report["verdict"] = judge(report)
    rep.save(report, stem.with_suffix(".json"))
    plotted = rep.plot(report, stem.with_suffix(".png"))
    text = rep.summary(report)
    stem.with_suffix(".txt").write_text(text + "\n")
    print()
    print(text)
    print(
        f"\nreport: {stem.with_suffix('.json')}"
        + (
            f", plot: {stem.with_suffix('.png')}"
            if plotted
            else " (no plot: install matplotlib, e.g. pip install -e '.[soak]')"
        )
    )
    return 0 if report["verdict"]["passed"] else 1


async def soak(args: argparse.Namespace) -> int:
    duration = parse_duration(args.duration)
    warmup = parse_duration(args.warmup) if args.warmup else min(600.0, 0.2 * duration)
    interval = parse_duration(args.interval)
    faults = parse_faults(args.faults, duration)
    mix = parse_mix(args.mix)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    random.seed(seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"soak-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    run_dir = Path(tempfile.mkdtemp(prefix="exai-soak-"))
    started = wall()
    print(f"[soak] {started}: run folder {run_dir}, {duration / 60:.1f} min, seed {seed}", flush=True)
    report: dict[str, Any] = {
        "meta": {
            "started": started,
            "duration_s": duration,
            "seed": seed,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "argv": sys.argv[1:],
        },
        "config": {
            "warmup_s": warmup,
            "interval_s": interval,
            "clients": args.clients,
            "instances": args.instances,
            "max_instances": args.max_instances,
            "mix": mix,
            "handshake_share": args.handshake_share,
            "abandon_share": args.abandon_share,
            "think": args.think,
            "idle_timeout_s": parse_duration(args.idle_timeout),
            "leak_bytes_per_call": args.leak_bytes,
            "fault_grace_s": FAULT_GRACE,
        },
    }
    try:
        await _run(args, report, run_dir, duration, interval, faults, mix)
    finally:
        if args.keep:
            print(f"[soak] kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return finish(report, stem)


async def _run(
    args: argparse.Namespace,
    report: dict[str, Any],
    run_dir: Path,
    duration: float,
    interval: float,
    faults: list[Any],
    mix: dict[str, float],
) -> None:
    acklog = AckLog(run_dir / "acks.jsonl")
    async with postgres(run_dir) as (dsn, where):
        report["meta"]["postgres"] = where
        redis = OwnRedis(run_dir / "redis", free_port())
        await asyncio.to_thread(redis.start)
        report["meta"]["redis"] = f"own redis-server on port {redis.embedded.port}"
        try:
            proxy = pg_proxy(dsn)
            with proxy.running(), RealisticProvider().running() as provider:
                fleet = Fleet(
                    run_dir / "state",
                    database_url=proxied(dsn, proxy),
                    redis_url=redis.url,
                    redis_prefix="soak",
                    instances=args.instances,
                    max_instances=args.max_instances,
                    overrides={
                        "log_level": "WARNING",
                        "glm_api_key": "fake-key",
                        "glm_api_url": provider.glm_url,
                        "session_idle_timeout": parse_duration(args.idle_timeout),
                        "test_leak_per_call_bytes": args.leak_bytes,
                    },
                )
                await asyncio.to_thread(fleet.start)
                try:
                    await _load(
                        args, report, fleet, dsn, redis, proxy, acklog, duration, interval, faults, mix
                    )
                finally:
                    print("[soak] stopping the fleet (instances drain their spools)", flush=True)
                    await asyncio.to_thread(fleet.stop)
            report["acks"] = await ack_check.check(acklog, dsn)
            report["acks"]["logged"] = acklog.counts()
        finally:
            await asyncio.to_thread(redis.stop)


async def _load(
    args: argparse.Namespace,
    report: dict[str, Any],
    fleet: Fleet,
    dsn: str,
    redis: OwnRedis,
    proxy: Any,
    acklog: AckLog,
    duration: float,
    interval: float,
    faults: list[Any],
    mix: dict[str, float],
) -> None:
    calls = CallLog(t0=time.monotonic())
    sdk_log = logging.getLogger("mcp.client.streamable_http")
    sdk_log.addHandler(TerminationFailures(calls))
    sdk_log.propagate = False  # counted, not printed
    shared = Shared(fleet.router_url, calls, acklog, think=args.think)
    probe = Probe(fleet, dsn, redis.url, calls)
    stop = asyncio.Event()
    actors = [
        Actor(shared, mix, i, args.handshake_share, args.abandon_share, random.Random(random.random()))
        for i in range(args.clients)
    ]
    sampler_stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop), name=f"actor-{a.index}") for a in actors]
    sampler = asyncio.create_task(_sample(probe, interval, sampler_stop, acklog))
    scheduler = asyncio.create_task(run_schedule(faults, fleet, redis, proxy, calls.now, stop))
    try:
        end = time.monotonic() + duration
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(60.0, left))
            last = probe.samples[-1] if probe.samples else {}
            print(
                f"[soak {calls.now():7.1f}s] calls {len(calls.calls)} "
                f"({sum(1 for c in calls.calls if not c.ok)} failed), sessions {last.get('sessions')}, "
                f"pg {last.get('pg_conns')}, redis {last.get('redis_clients')}, "
                f"spool {last.get('spool_rows')}, procs "
                + " ".join(
                    f"{n}={p['rss_mb']:.0f}MB/{p['fds']}fd" for n, p in sorted(last.get("procs", {}).items())
                ),
                flush=True,
            )
    finally:
        stop.set()
        sampler_stop.set()
        # Let sessions finish their current scenario; then cancel what is left.
        _, pending = await asyncio.wait([*tasks, scheduler], timeout=60)
        calls.frozen = True
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sampler
        await acklog.save()
        await probe.close()
    cutoff = duration
    report["faults"] = [f.to_dict() for f in faults]
    report["fault_windows"] = [w for f in faults if (w := f.window()) is not None]
    report["samples"] = [s for s in probe.samples if s["t"] <= cutoff + interval]
    errors = [asdict(c) for c in calls.calls if not c.ok]
    report["errors"] = errors
    report["calls"] = rep.call_summary(calls.calls)
    report["calls"]["after_end"] = sum(1 for c in calls.calls if c.t > cutoff)


async def _sample(probe: Probe, interval: float, stop: asyncio.Event, acklog: AckLog) -> None:
    while not stop.is_set():
        await probe.sample()
        await acklog.save()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
