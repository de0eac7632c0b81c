"""The soak's verdict (tests/soak/verdict.py) on made-up runs: leaks fail, noise and faults do not.

The soak itself runs outside pytest (`python -m tests.soak`, and a short one in .ci/run); these
check only its judging, which is plain arithmetic over samples.
"""

from __future__ import annotations

import random
from typing import Any

from tests.soak.verdict import judge, theil_sen


def _run(
    rss: list[float], *, errors: list[dict[str, Any]] | None = None, windows: Any = ()
) -> dict[str, Any]:
    """A 1-hour run sampled every 5 s; instance_01's RSS is `rss`, everything else flat."""
    samples = []
    for i, mb in enumerate(rss):
        samples.append(
            {
                "t": i * 5.0,
                "procs": {
                    "instance_01": {"pid": 100, "rss_mb": mb, "fds": 15},
                    "router": {"pid": 101, "rss_mb": 60.0, "fds": 20},
                },
                "pg_conns": 5,
                "redis_clients": 9,
                "redis_keys": {"session": 4, "lease": 4, "thread": i},  # thread caches may grow
                "fast_p50_ms": 15.0,
            }
        )
    return {
        "config": {"warmup_s": 600.0, "interval_s": 5.0},
        "samples": samples,
        "fault_windows": list(windows),
        "faults": [],
        "errors": errors or [],
        "calls": {"ok": 1000},
        "acks": {"checked": {"chat_turns": 10}, "missing": []},
    }


def test_theil_sen_ignores_outliers_a_least_squares_fit_would_follow() -> None:
    xs = [float(i) for i in range(100)]
    ys = [2.0 * x for x in xs]
    ys[50] = 10_000.0
    assert abs(theil_sen(xs, ys) - 2.0) < 1e-9


def test_noisy_but_flat_memory_passes() -> None:
    rng = random.Random(1)
    rss = [85.0 + rng.uniform(-3, 3) + (8.0 if i % 97 == 0 else 0.0) for i in range(720)]
    verdict = judge(_run(rss))
    assert verdict["passed"], verdict["failures"]


def test_a_slow_leak_fails_naming_process_and_signal() -> None:
    rng = random.Random(2)
    rss = [85.0 + i * 5 / 3600 * 40 + rng.uniform(-2, 2) for i in range(720)]  # +40 MB/hour
    verdict = judge(_run(rss))
    assert not verdict["passed"]
    assert len(verdict["failures"]) == 1
    assert verdict["failures"][0].startswith("instance_01 (pid 100): rss_mb grew +")


def test_a_pool_that_refills_after_a_restart_passes() -> None:
    """RSS here stands for any counter: it drops at a fault and climbs back to its old level."""
    rss = [100.0] * 300 + [60.0 + min(40.0, i * 0.1) for i in range(420)]
    verdict = judge(_run(rss))
    assert verdict["passed"], verdict["failures"]


def test_errors_fail_only_outside_fault_windows() -> None:
    flat = [85.0] * 720
    during = {
        "t": 1000.0,
        "dur": 2.0,
        "op": "task_create",
        "era": "stateless",
        "error": "[storage_unavailable]",
    }
    after = {"t": 2000.0, "dur": 0.1, "op": "chat", "era": "handshake", "error": "boom"}
    assert judge(_run(flat, errors=[during], windows=[(990.0, 1100.0)]))["passed"]
    verdict = judge(_run(flat, errors=[during, after], windows=[(990.0, 1100.0)]))
    assert not verdict["passed"]
    assert "1 of 2 failed calls fell outside every fault window" in verdict["failures"][0]


def test_a_missing_acknowledged_write_fails() -> None:
    run = _run([85.0] * 720)
    run["acks"]["missing"] = ["task 1234 (acknowledged) has no row"]
    verdict = judge(run)
    assert not verdict["passed"]
    assert "1 acknowledged writes missing" in verdict["failures"][0]


def _restarted(final_mb: float) -> dict[str, Any]:
    """instance_02 is killed at 300 s; its new pid idles at 93 MB, then grows to `final_mb`
    once it serves sessions. instance_01 stays at 135 MB throughout."""
    run = _run([135.0] * 720)
    for s in run["samples"]:
        i = int(s["t"] // 5)
        if s["t"] < 300:
            s["procs"]["instance_02"] = {"pid": 200, "rss_mb": 135.0, "fds": 15}
        else:
            grown = 93.0 + (final_mb - 93.0) * min(1.0, max(0.0, (i - 300) / 300))
            s["procs"]["instance_02"] = {"pid": 201, "rss_mb": grown, "fds": 15}
    return run


def test_a_restarted_process_growing_to_its_peers_size_passes() -> None:
    verdict = judge(_restarted(136.0))
    assert verdict["passed"], verdict["failures"]


def test_a_restarted_process_growing_past_its_peers_fails() -> None:
    verdict = judge(_restarted(200.0))
    assert not verdict["passed"]
    assert verdict["failures"][0].startswith("instance_02 (pid 201): rss_mb grew +")


def test_note_scope_caches_may_grow_but_other_keys_may_not() -> None:
    """One notes copy (and generation counter) per thread or scope used: TTL-bounded, like
    thread caches, so they grow with the traffic; a growing kind that has no TTL fails."""
    run = _run([85.0] * 720)
    for i, s in enumerate(run["samples"]):
        s["redis_keys"].update({"notes": i, "notes-gen": i // 2})
    verdict = judge(run)
    assert verdict["passed"], verdict["failures"]
    for i, s in enumerate(run["samples"]):
        s["redis_keys"]["lease"] = 4 + i
    verdict = judge(run)
    assert not verdict["passed"]
    assert any("keys 'lease' grew" in f for f in verdict["failures"]), verdict["failures"]
