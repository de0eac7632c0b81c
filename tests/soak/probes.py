"""Sampling the fleet every few seconds while the load runs.

One sample holds:

- per process (supervisord, router, each instance; by supervisord's name, with its pid so a
  restart starts a new series): RSS in MB (`VmRSS` of /proc/PID/status) and open file
  descriptors (entries of /proc/PID/fd);
- `pg_conns`: backends in pg_stat_activity connected to the fleet's database (the probe's own
  connection excluded);
- `redis_clients`: `INFO clients` connected_clients of the soak's Redis, minus the probe's own;
- `get_streams`: notification streams (GET and subscriptions/listen) the router holds open
  (`exai_router_notify_streams` of its /metrics);
- `redis_keys`: the fleet's keys by kind (the second part of the name: session, lease,
  instance, thread, ...), `sessions` (ZCARD of the session index) and `leases`;
- `spool_rows` / `spool_bytes`: rows waiting in the instances' write-behind spools (read-only
  from each spool's SQLite file);
- calls finished since the previous sample: `calls_per_s`, `errors`, `p50_ms`/`p99_ms` over all
  calls and `fast_p50_ms` over the calls that do not wait for the LLM (everything but chat).

A probe that fails (Redis restarting, Postgres cut) records None for what it could not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from tests.fleet import Fleet
from tests.soak.mix import CallLog

SLOW_OPS = frozenset({"chat"})


def proc_stats(pid: int) -> dict[str, float] | None:
    """{"rss_mb", "fds"} of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            rss_kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return {"rss_mb": round(rss_kb / 1024, 2), "fds": fds}


def _processes(fleet: Fleet) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    pids: list[tuple[str, int]] = []
    with contextlib.suppress(Exception):
        pids.append(("supervisord", fleet.supervisor.pid()))
    with contextlib.suppress(Exception):
        pids += [(p.name, p.pid) for p in fleet.processes() if p.pid and p.state == "RUNNING"]
    for name, pid in pids:
        stats = proc_stats(pid)
        if stats is not None:
            out[name] = {"pid": pid, **stats}
    return out


def _spools(state_dir: Path) -> tuple[int, int]:
    rows = size = 0
    for path in sorted((state_dir / "spool").glob("*/spool.sqlite3")):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
            try:
                n, b = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM spool").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            continue
        rows += int(n)
        size += int(b)
    return rows, size


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 1)


@dataclass
class Probe:
    fleet: Fleet
    pg_dsn: str  # direct, not through the cuttable proxy
    redis_url: str
    calls: CallLog
    samples: list[dict[str, Any]] = field(default_factory=list)
    _pg: asyncpg.Connection | None = None
    _redis: aioredis.Redis | None = None
    _last_t: float = 0.0
    _next_call: int = 0

    async def close(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                await self._pg.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    async def _pg_conns(self) -> int | None:
        try:
            if self._pg is None or self._pg.is_closed():
                self._pg = await asyncpg.connect(self.pg_dsn, timeout=5)
            dbname = self.pg_dsn.rsplit("/", 1)[1]
            q = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
            return int(await self._pg.fetchval(q, dbname, timeout=5))
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
            self._pg = None
            return None

    async def _redis_stats(self) -> dict[str, Any]:
        keys = self.fleet.keys
        try:
            if self._redis is None:
                self._redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)
            r = self._redis
            clients = int((await r.info("clients"))["connected_clients"]) - 1
            kinds: dict[str, int] = {}
            async for key in r.scan_iter(match=keys.pattern(), count=1000):
                kind = key.split(":", 2)[1] if key.count(":") else key
                kinds[kind] = kinds.get(kind, 0) + 1
            sessions = int(await r.zcard(keys.sessions()))
            return {
                "redis_clients": clients,
                "redis_keys": kinds,
                "redis_total_keys": sum(kinds.values()),
                "sessions": sessions,
                "leases": kinds.get("lease", 0),
            }
        except Exception:  # Redis restarting: nothing to read this time
            if self._redis is not None:
                with contextlib.suppress(Exception):
                    await self._redis.aclose()
            self._redis = None
            return {
                "redis_clients": None,
                "redis_keys": None,
                "redis_total_keys": None,
                "sessions": None,
                "leases": None,
            }

    async def _get_streams(self) -> int | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(self.fleet.router_url + "/metrics") as r,
            ):
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        # The router holds notification streams itself (GET and subscriptions/listen, by kind).
        open_streams = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("exai_router_notify_streams{")
        ]
        return int(sum(open_streams)) if open_streams else None

    def _call_stats(self, t: float) -> dict[str, Any]:
        calls = self.calls.calls
        new = calls[self._next_call :]
        self._next_call = len(calls)
        first, span = not self.samples, max(1e-6, t - self._last_t)
        self._last_t = t
        ok = [c for c in new if c.ok and c.op not in ("open", "end", "close")]
        fast = [c.dur for c in ok if c.op not in SLOW_OPS]
        return {
            "calls": len(new),
            "calls_per_s": None if first else round(len(new) / span, 3),
            "errors": sum(1 for c in new if not c.ok),
            "p50_ms": round(statistics.median([c.dur for c in ok]) * 1000, 1) if ok else None,
            "p99_ms": _pct([c.dur for c in ok], 0.99),
            "fast_p50_ms": round(statistics.median(fast) * 1000, 1) if fast else None,
            "chat_p50_ms": _pct([c.dur for c in ok if c.op == "chat"], 0.5),
        }

    async def sample(self) -> dict[str, Any]:
        t = self.calls.now()
        procs, spool, pg, rd, streams = await asyncio.gather(
            asyncio.to_thread(_processes, self.fleet),
            asyncio.to_thread(_spools, self.fleet.settings.state_dir),
            self._pg_conns(),
            self._redis_stats(),
            self._get_streams(),
        )
        sample = {
            "t": round(t, 2),
            "procs": procs,
            "pg_conns": pg,
            **rd,
            "get_streams": streams,
            "spool_rows": spool[0],
            "spool_bytes": spool[1],
            **self._call_stats(t),
        }
        self.samples.append(sample)
        return sample

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
