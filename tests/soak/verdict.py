"""The soak's verdict: pass only when nothing grows, drifts, fails unexplained or gets lost.

Growth is a Theil–Sen slope (the median of the slopes between every pair of samples), fitted
over the samples after warm-up. It ignores a GC pause, a burst of connections or a few noisy
samples from other work on the machine, which a least-squares fit would follow, yet follows a
steady climb however small each step is. A signal fails when BOTH hold:

- its slope is above `per_hour` (the rate a real leak shows and noise on a busy shared 2-core
  machine does not: a few MB of allocator and cache settling per process, fds and
  connections that come and go with the load), and
- the growth the slope implies over the fitted span is above `min_growth` (so a two-minute CI
  run, where a 1 MB wobble is 40 MB/hour, only fails on a leak that is large in absolute terms),
- and it is still climbing: the median of the last quarter of the span is above the highest
  value of the first quarter. A connection pool that empties when Redis restarts and refills
  to its old size afterwards, or RSS that steps up once when a new code path first runs, then
  stays, does not pass this; a leak keeps setting new highs.

| signal | per_hour | min_growth | series |
|---|---|---|---|
| rss_mb | 20 MB/h | 8 MB | each process (a restarted pid starts a new series with its own warm-up) |
| fds | 30 /h | 12 | each process, same |
| pg_conns | 10 /h | 6 | backends on the fleet's database |
| redis_clients | 10 /h | 6 | clients of the soak's Redis |
| get_streams | 10 /h | 6 | GET streams the router holds open to instances |
| redis_keys:KIND | 60 /h | 20 | fleet keys of each kind but the per-thread and per-scope caches |
| | | | (`thread`, `thread-meta`, `thread-pos`, `thread-xids`, `cache`, `notes`, `notes-gen`: |
| | | | one per thread or note scope used, so they grow with the traffic; their |
| | | | TTL bounds them, not the load) |

A process series is fitted only if it covers at least 40% of the post-warm-up span (an
instance started late, or killed early, has too little to say). A process restarted mid-run
that fails the slope test but ends no larger than the largest peer of its kind (instance_03
against the other instances) plus `min_growth` passes: it was warming up, which for an
instance happens when it first serves sessions, not on a timer.

Latency drift: the slope of `fast_p50_ms` (tool calls that do not wait for the LLM) after
warm-up, samples inside fault windows left out; it fails when the rise over the span is more than
both 50 ms and half the median.

Errors: every failed call whose span does not overlap a fault window (fault start - 1 s to end
+ grace) fails the run. Lost writes: any acknowledged write missing from Postgres fails it.
A scheduled fault that could not be injected fails it too (the run did not test what it said).
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limit:
    per_hour: float
    min_growth: float
    unit: str


LIMITS: dict[str, Limit] = {
    "rss_mb": Limit(20.0, 8.0, "MB"),
    "fds": Limit(30.0, 12.0, "fds"),
    "pg_conns": Limit(10.0, 6.0, "connections"),
    "redis_clients": Limit(10.0, 6.0, "connections"),
    "get_streams": Limit(10.0, 6.0, "streams"),
    "redis_keys": Limit(60.0, 20.0, "keys"),
}
TTL_BOUNDED_KINDS = frozenset(
    {"thread", "thread-meta", "thread-pos", "thread-xids", "cache", "notes", "notes-gen"}
)
MIN_COVERAGE = 0.4
DRIFT_ABS_MS = 50.0
DRIFT_REL = 0.5
MAX_POINTS = 400


@dataclass
class Check:
    name: str  # what was checked, e.g. "instance_02 rss_mb"
    ok: bool
    message: str
    value: float | None = None


def theil_sen(xs: list[float], ys: list[float]) -> float:
    """Median of pairwise slopes (subsampled to MAX_POINTS points, evenly)."""
    if len(xs) > MAX_POINTS:
        step = len(xs) / MAX_POINTS
        idx = [int(i * step) for i in range(MAX_POINTS)]
        xs, ys = [xs[i] for i in idx], [ys[i] for i in idx]
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i])
        for i in range(len(xs))
        for j in range(i + 1, len(xs))
        if xs[j] != xs[i]
    ]
    return statistics.median(slopes) if slopes else 0.0


def growth_check(
    name: str, signal: str, points: list[tuple[float, float]], limit: Limit, span: float
) -> Check | None:
    """Slope test of one series (t in seconds). None when it covers too little of `span`."""
    if len(points) < 5 or span <= 0:
        return None
    covered = points[-1][0] - points[0][0]
    if covered < MIN_COVERAGE * span:
        return None
    slope_h = theil_sen([p[0] for p in points], [p[1] for p in points]) * 3600
    growth = slope_h * covered / 3600
    quarter = max(1, len(points) // 4)
    first_high = max(p[1] for p in points[:quarter])
    last_median = statistics.median(p[1] for p in points[-quarter:])
    climbing = last_median > first_high
    ok = not (slope_h > limit.per_hour and growth > limit.min_growth and climbing)
    message = (
        f"{name}: {signal} grew {slope_h:+.1f} {limit.unit}/hour after warm-up "
        f"({growth:+.1f} {limit.unit} over {covered / 60:.1f} min, Theil–Sen over {len(points)} samples; "
        f"limit {limit.per_hour:g} {limit.unit}/hour and {limit.min_growth:g} {limit.unit}; "
        f"last quarter's median {last_median:g} vs first quarter's high {first_high:g})"
    )
    return Check(f"{name} {signal}", ok, message, round(slope_h, 3))


def _stalls(samples: list[dict[str, Any]], interval: float, faults: list[dict[str, Any]]) -> list[str]:
    """Not failures, but worth knowing: the soak itself (or the machine) stopped for a while."""
    notes = [
        f"no sample for {b['t'] - a['t']:.0f} s after {a['t']:.0f} s: the soak process or the machine stalled"
        for a, b in itertools.pairwise(samples)
        if b["t"] - a["t"] > 3 * interval
    ]
    notes += [
        f"fault {f['kind']} started {f['started'] - f['at']:.0f} s late (scheduled at {f['at']:.0f} s)"
        for f in faults
        if f.get("started") is not None and f["started"] - f["at"] > 10
    ]
    return notes


def _kind(name: str) -> str:
    """instance_03 -> instance: processes running the same program, sized alike."""
    return re.sub(r"_\d+$", "", name)


def _against_peers(
    check: Check,
    name: str,
    pid: int,
    signal: str,
    points: list[tuple[float, float]],
    series: dict[tuple[str, int], list[tuple[float, dict[str, float]]]],
    limit: Limit,
) -> Check:
    """A process restarted mid-run (a fault's kill) that climbs to the size its peers already
    had is warming up: it loads code paths and fills caches only when it first serves sessions,
    which may be well after its own warm-up window. It still fails when it ends above the
    largest peer of its kind by more than the limit's min_growth."""
    peers = [
        float(p[signal])
        for (other, other_pid), pts in series.items()
        if _kind(other) == _kind(name) and (other, other_pid) != (name, pid)
        for _, p in pts
    ]
    if not peers:
        return check
    ceiling = max(peers) + limit.min_growth
    quarter = max(1, len(points) // 4)
    last_median = statistics.median(p[1] for p in points[-quarter:])
    if last_median > ceiling:
        return check
    return Check(
        check.name,
        True,
        f"{check.message}; restarted mid-run and ends at {last_median:g}, within its peers' "
        f"largest {max(peers):g} + {limit.min_growth:g} {limit.unit}: warm-up, not a leak",
        check.value,
    )


def _in_windows(t0: float, t1: float, windows: list[tuple[float, float]]) -> bool:
    return any(t0 <= end and t1 >= start for start, end in windows)


def judge(report: dict[str, Any]) -> dict[str, Any]:
    """{"passed": bool, "failures": [messages], "checks": [...]} for a report (see report.py)."""
    samples: list[dict[str, Any]] = report["samples"]
    warmup = float(report["config"]["warmup_s"])
    windows = [(w[0], w[1]) for w in report["fault_windows"]]
    post = [s for s in samples if s["t"] >= warmup]
    span = (post[-1]["t"] - post[0]["t"]) if len(post) > 1 else 0.0
    checks: list[Check] = []
    skipped: list[str] = []

    # processes: one series per (name, pid), each with its own warm-up after it appeared
    series: dict[tuple[str, int], list[tuple[float, dict[str, float]]]] = {}
    for s in samples:
        for name, p in s["procs"].items():
            series.setdefault((name, p["pid"]), []).append((s["t"], p))
    for (name, pid), pts in sorted(series.items()):
        born = pts[0][0] if pts[0][0] > samples[0]["t"] + 1 else float("-inf")
        start = max(warmup, born + warmup)
        for signal in ("rss_mb", "fds"):
            points = [(t, float(p[signal])) for t, p in pts if t >= start]
            c = growth_check(f"{name} (pid {pid})", signal, points, LIMITS[signal], span)
            if c is None:
                skipped.append(f"{name} (pid {pid}) {signal}: too short after warm-up")
                continue
            if not c.ok and born > float("-inf"):
                c = _against_peers(c, name, pid, signal, points, series, LIMITS[signal])
            checks.append(c)

    for signal in ("pg_conns", "redis_clients", "get_streams"):
        points = [(s["t"], float(s[signal])) for s in post if s.get(signal) is not None]
        c = growth_check("fleet", signal, points, LIMITS[signal], span)
        if c is not None:
            checks.append(c)
    kinds = sorted({k for s in post for k in (s.get("redis_keys") or {})} - TTL_BOUNDED_KINDS)
    for kind in kinds:
        points = [
            (s["t"], float(s["redis_keys"].get(kind, 0))) for s in post if s.get("redis_keys") is not None
        ]
        c = growth_check("Redis", f"keys '{kind}'", points, LIMITS["redis_keys"], span)
        if c is not None:
            checks.append(c)

    lat = [(s["t"], float(s["fast_p50_ms"])) for s in post if s.get("fast_p50_ms") is not None]
    lat = [p for p in lat if not _in_windows(p[0] - 5, p[0], windows)]
    if len(lat) >= 5 and span > 0:
        slope = theil_sen([p[0] for p in lat], [p[1] for p in lat])
        covered = lat[-1][0] - lat[0][0]
        rise = slope * covered
        median = statistics.median(p[1] for p in lat)
        limit = max(DRIFT_ABS_MS, DRIFT_REL * median)
        checks.append(
            Check(
                "latency drift",
                rise <= limit,
                f"fleet: p50 latency of non-LLM calls drifted {rise:+.1f} ms over {covered / 60:.1f} min "
                f"(median {median:.1f} ms; limit +{limit:.0f} ms)",
                round(rise, 2),
            )
        )

    errors = report["errors"]
    unexplained = [e for e in errors if not _in_windows(e["t"], e["t"] + e["dur"], windows)]
    kinds_seen = Counter(f"{e['op']} ({e['era']}): {e['error'][:120]}" for e in unexplained)
    detail = "; ".join(f"{n}× {k}" for k, n in kinds_seen.most_common(5))
    checks.append(
        Check(
            "errors outside faults",
            not unexplained,
            f"{len(unexplained)} of {len(errors)} failed calls fell outside every fault window"
            + (f", first at {unexplained[0]['t']:.0f} s: {detail}" if unexplained else ""),
            len(unexplained),
        )
    )

    acks = report.get("acks") or {}
    missing = acks.get("missing")
    if missing is None:
        checks.append(Check("acknowledged writes", False, "the acknowledged writes were not checked", None))
    else:
        checked = acks.get("checked", {})
        checks.append(
            Check(
                "acknowledged writes",
                not missing,
                f"{len(missing)} acknowledged writes missing from Postgres "
                f"(checked {checked})" + (": " + "; ".join(missing[:5]) if missing else ""),
                len(missing),
            )
        )

    for f in report["faults"]:
        if f.get("error") or f.get("started") is None:
            checks.append(
                Check(
                    f"fault {f['kind']}",
                    False,
                    f"scheduled fault {f['kind']} at {f['at']:.0f} s did not run: {f.get('error')}",
                )
            )
    if report.get("calls", {}).get("ok", 0) == 0:
        checks.append(Check("load", False, "no call succeeded: the soak drove nothing"))

    notes = _stalls(samples, float(report["config"]["interval_s"]), report["faults"])
    failures = [c.message for c in checks if not c.ok]
    return {
        "passed": not failures,
        "failures": failures,
        "checks": [asdict(c) for c in checks],
        "skipped": skipped,
        "notes": notes,
    }
