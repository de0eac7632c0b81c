"""The soak's report: one JSON file, one PNG (one panel per signal, faults shaded), one paragraph.

The JSON holds everything the verdict needs (config, faults and their windows, samples, failed
calls, per-tool call counts and latencies, the acknowledged-write check), so
`python -m tests.soak --report FILE.json` judges and plots a saved run again. The plot needs
matplotlib (`pip install -e '.[soak]'`); without it the run still writes JSON and the summary.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.soak.mix import Call
from tests.soak.verdict import TTL_BOUNDED_KINDS

FAULT_COLOURS = {"kill": "tab:red", "redis": "tab:purple", "pg": "tab:orange"}


def call_summary(calls: list[Call]) -> dict[str, Any]:
    by_op: dict[str, list[Call]] = defaultdict(list)
    for c in calls:
        by_op[c.op].append(c)
    ops = {}
    for op, cs in sorted(by_op.items()):
        durs = sorted(c.dur for c in cs if c.ok)
        ops[op] = {
            "n": len(cs),
            "errors": sum(1 for c in cs if not c.ok),
            "p50_ms": round(statistics.median(durs) * 1000, 1) if durs else None,
            "p99_ms": round(durs[min(len(durs) - 1, int(len(durs) * 0.99))] * 1000, 1) if durs else None,
        }
    eras: dict[str, int] = defaultdict(int)
    for c in calls:
        if c.op == "open" and c.ok:
            eras[c.era] += 1
    return {
        "n": len(calls),
        "ok": sum(1 for c in calls if c.ok),
        "errors": sum(1 for c in calls if not c.ok),
        "sessions_opened": dict(eras),
        "by_op": ops,
    }


def save(report: dict[str, Any], path: Path) -> None:
    """Indented JSON, with one line per sample and per failed call (an hour is 720 samples)."""
    rows = {k: report.get(k, []) for k in ("errors", "samples")}
    head = json.dumps({k: v for k, v in report.items() if k not in rows}, indent=1)
    parts = [head[: head.rfind("}")].rstrip()]
    for key, items in rows.items():
        lines = ",\n  ".join(json.dumps(x) for x in items)
        parts.append(f',\n "{key}": [\n  {lines}\n ]' if items else f',\n "{key}": []')
    path.write_text("".join(parts) + "\n}\n")


def summary(report: dict[str, Any]) -> str:
    cfg, calls, verdict = report["config"], report["calls"], report["verdict"]
    samples = report["samples"]
    post = [s for s in samples if s["t"] >= cfg["warmup_s"]]
    faults = ", ".join(
        f"{f['kind']} at {f['started']:.0f} s" if f.get("started") is not None else f"{f['kind']} (not run)"
        for f in report["faults"]
    )
    rss = _final_rss(samples)
    acks = report.get("acks") or {}
    checked = acks.get("checked") or {}
    state = "PASSED" if verdict["passed"] else "FAILED"
    text = (
        f"Soak {state}: {report['meta']['duration_s'] / 60:.1f} min against a supervised fleet of "
        f"{cfg['instances']}-{cfg['max_instances']} instances, {cfg['clients']} concurrent clients, "
        f"{sum(calls['sessions_opened'].values())} sessions ({_eras(calls)}), {calls['n']} calls "
        f"({calls['errors']} failed; mean {calls['n'] / max(1, report['meta']['duration_s']):.2f} calls/s); "
        f"faults: {faults or 'none'}. "
        f"After the {cfg['warmup_s'] / 60:.1f} min warm-up, RSS at the end: {rss}; "
        f"Postgres connections {_range(post, 'pg_conns')}, Redis clients {_range(post, 'redis_clients')}, "
        f"sessions {_range(post, 'sessions')}, spool rows {_range(post, 'spool_rows')}. "
        f"Acknowledged writes checked in Postgres: {checked.get('chat_turns', 0)} chat turns, "
        f"{checked.get('tasks', 0)} tasks, {checked.get('notes', 0)} notes; "
        f"{len(acks.get('missing') or [])} missing."
    )
    if verdict["failures"]:
        text += " Failures: " + " | ".join(verdict["failures"])
    if verdict.get("notes"):
        text += " Notes: " + " | ".join(verdict["notes"])
    return text


def _eras(calls: dict[str, Any]) -> str:
    return ", ".join(f"{n} {era}" for era, n in sorted(calls["sessions_opened"].items()))


def _range(samples: list[dict[str, Any]], key: str) -> str:
    values = [s[key] for s in samples if s.get(key) is not None]
    return f"{min(values)}-{max(values)}" if values else "n/a"


def _final_rss(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return "n/a"
    last = samples[-1]["procs"]
    return ", ".join(f"{name} {p['rss_mb']:.0f} MB" for name, p in sorted(last.items()))


def plot(report: dict[str, Any], path: Path) -> bool:
    """Write the PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = report["samples"]
    t = [s["t"] / 60 for s in samples]
    panels: list[tuple[str, list[tuple[str, list[float | None]]]]] = []
    names = sorted({n for s in samples for n in s["procs"]})
    for signal, title in (("rss_mb", "RSS (MB)"), ("fds", "open fds")):
        lines = [(n, [s["procs"][n][signal] if n in s["procs"] else None for s in samples]) for n in names]
        panels.append((title, lines))
    panels.append(
        (
            "connections",
            [
                ("Postgres (fleet db)", _col(samples, "pg_conns")),
                ("Redis clients", _col(samples, "redis_clients")),
                ("GET streams (router)", _col(samples, "get_streams")),
            ],
        )
    )
    keys = [
        ("sessions", _col(samples, "sessions")),
        ("leases", _col(samples, "leases")),
        ("all fleet keys", _col(samples, "redis_total_keys")),
        ("all but thread and note caches", [_uncached(s) for s in samples]),
    ]
    panels.append(("Redis keys", keys))
    panels.append(("spool backlog (rows)", [("rows", _col(samples, "spool_rows"))]))
    panels.append(
        ("calls/s, errors", [("calls/s", _col(samples, "calls_per_s")), ("errors", _col(samples, "errors"))])
    )
    panels.append(
        (
            "latency (ms)",
            [
                ("p50 all", _col(samples, "p50_ms")),
                ("p99 all", _col(samples, "p99_ms")),
                ("p50 non-LLM", _col(samples, "fast_p50_ms")),
            ],
        )
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.3 * len(panels)), sharex=True)
    verdict = report["verdict"]
    fig.suptitle(
        f"EXAI soak {report['meta']['started']} — {'PASSED' if verdict['passed'] else 'FAILED'}"
        f" ({report['meta']['duration_s'] / 60:.0f} min)",
        fontsize=11,
    )
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for label, ys in lines:
            ax.plot(t, [float("nan") if y is None else y for y in ys], label=label, linewidth=0.9)
        ax.set_ylabel(title, fontsize=8)
        if title.startswith("latency"):
            ax.set_yscale("log")
        ax.axvline(report["config"]["warmup_s"] / 60, color="grey", linestyle=":", linewidth=0.8)
        for f in report["faults"]:
            if f.get("started") is None:
                continue
            end = f.get("ended") or f["started"]
            ax.axvspan(
                f["started"] / 60, max(end, f["started"] + 2) / 60, color=FAULT_COLOURS[f["kind"]], alpha=0.25
            )
        ax.legend(fontsize=6, loc="upper left", ncol=4)
        ax.tick_params(labelsize=7)
    top = axes[0]
    for f in report["faults"]:
        if f.get("started") is not None:
            top.annotate(
                f["kind"],
                (f["started"] / 60, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color=FAULT_COLOURS[f["kind"]],
                va="bottom",
            )
    axes[-1].set_xlabel(
        "minutes (dotted: end of warm-up; shaded: faults — "
        "red kill -9, purple Redis restart, orange Postgres cut)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _uncached(sample: dict[str, Any]) -> float | None:
    kinds = sample.get("redis_keys")
    if kinds is None:
        return None
    return float(sum(n for kind, n in kinds.items() if kind not in TTL_BOUNDED_KINDS))


def _col(samples: list[dict[str, Any]], key: str) -> list[float | None]:
    return [s.get(key) for s in samples]
