"""The event loop watchdog (common/loopwatch.py): it names a blocking call, counts it, and stays
quiet on a loop that only waits. Each test runs its own loop (asyncio's and uvloop's) in a
thread of its own, as the router and the instances run theirs."""

from __future__ import annotations

import asyncio
import logging
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from common import loopwatch
from common.eventloop import loop_factory
from common.loopwatch import LoopWatch, Stall

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if (uv := loop_factory()) is not None:
    LOOPS["uvloop"] = uv


def _run(
    factory: Callable[[], asyncio.AbstractEventLoop], body: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(body())


def _wait_for(watch: LoopWatch, count: int, timeout: float = 10.0) -> None:
    """Until the watchdog has recorded `count` stalls (its thread records them after the stall)."""
    deadline = time.monotonic() + timeout
    while watch.stalls_total < count and time.monotonic() < deadline:
        time.sleep(0.01)


def _blocks_the_loop() -> None:
    time.sleep(0.3)  # the deliberate blocking call the report must name


@pytest.mark.parametrize("flavour", sorted(LOOPS))
def test_a_sleep_on_the_loop_is_reported_once_with_its_stack_and_counted(
    flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    watches: list[LoopWatch] = []

    async def body() -> None:
        watch = LoopWatch(0.05, name="test-loop").start()
        watches.append(watch)
        await asyncio.sleep(0.25)  # the watchdog's first probes find the loop turning
        _blocks_the_loop()
        await asyncio.sleep(0.3)  # time for the thread to see the loop turn again
        _wait_for(watch, 1)
        watch.stop(join=2)

    with caplog.at_level(logging.WARNING, logger="exai.loopwatch"):
        _run(LOOPS[flavour], body)

    watch = watches[0]
    assert watch.stalls_total == 1
    stall: Stall = watch.recent[0]
    assert 0.05 <= stall.seconds <= 0.3 + 1  # measured from the probe that found it (a lower bound)
    assert watch.longest_seconds == stall.seconds
    stack = "".join(stall.stack)
    assert "_blocks_the_loop" in stack and "time.sleep(0.3)" in stack
    assert stall.kind == "blocked"  # off the CPU, inside a system call: a blocking call
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert stall.syscall in ("clock_nanosleep", "nanosleep", "select")
    assert stall.cpu_seconds < 0.05
    reports = [r.getMessage() for r in caplog.records if loopwatch.STALL_MARKER in r.getMessage()]
    assert len(reports) == 1
    assert "test-loop did not turn for at least" in reports[0] and "time.sleep(0.3)" in reports[0]
    metrics = watch.render()
    assert "exai_event_loop_stalls_total 1\n" in metrics
    assert f"exai_event_loop_longest_stall_seconds {stall.seconds:.6f}" in metrics


@pytest.mark.parametrize("flavour", sorted(LOOPS))
def test_cpu_work_on_the_loop_is_reported_as_cpu(flavour: str) -> None:
    watches: list[LoopWatch] = []

    async def body() -> None:
        watch = LoopWatch(0.05, name="test-loop").start()
        watches.append(watch)
        await asyncio.sleep(0.25)
        end = time.monotonic() + 0.4
        while time.monotonic() < end:  # busy: the loop thread spends the stall on the CPU
            sum(range(1000))
        await asyncio.sleep(0.3)
        _wait_for(watch, 1)
        watch.stop(join=2)

    _run(LOOPS[flavour], body)
    kinds = [s.kind for s in watches[0].recent]
    # A loaded machine may take the CPU away from the busy loop: the verdict goes by the loop
    # thread's own CPU time, which is still far above the threshold.
    assert kinds and "cpu" in kinds, [(s.seconds, s.cpu_seconds) for s in watches[0].recent]


@pytest.mark.parametrize("flavour", sorted(LOOPS))
def test_an_idle_loop_reports_nothing(flavour: str, caplog: pytest.LogCaptureFixture) -> None:
    watches: list[LoopWatch] = []

    async def body() -> None:
        watch = LoopWatch(0.05, name="idle-loop").start()
        watches.append(watch)
        for _ in range(10):  # waiting, on timers and on nothing: never a stall
            await asyncio.sleep(0.1)
        watch.stop(join=2)

    with caplog.at_level(logging.WARNING, logger="exai.loopwatch"):
        _run(LOOPS[flavour], body)
    # Stalls the machine causes (the process not scheduled) are told apart as "idle".
    real = [s for s in watches[0].recent if s.kind != "idle"]
    assert real == []
    logged = [r.getMessage() for r in caplog.records if "idle-loop" in r.getMessage()]
    assert [m for m in logged if "kind=idle" not in m] == []


def test_the_verdict_tells_the_machine_from_the_code() -> None:
    import traceback

    idle = traceback.StackSummary.from_list(
        [("/usr/lib/python3.11/asyncio/runners.py", 118, "run", "return self._loop.run_until_complete(task)")]
    )
    busy = traceback.StackSummary.from_list([("/x/instance/tools/chat.py", 10, "chat", "open(p).read()")])
    lock = traceback.StackSummary.from_list([("/usr/lib/python3.11/threading.py", 320, "wait", "")])
    assert loopwatch.classify(list(idle), 0.3, 0.0, 0.05, "running") == "idle"
    assert loopwatch.classify(list(busy), 0.3, 0.01, 0.05, "read") == "blocked"
    assert loopwatch.classify(list(busy), 0.3, 0.01, 0.05, "running") == "preempted"
    assert loopwatch.classify(list(busy), 0.3, 0.01, 0.05, "futex") == "preempted"  # the GIL
    assert loopwatch.classify(list(lock), 0.3, 0.01, 0.05, "futex") == "blocked"
    assert loopwatch.classify(list(busy), 0.3, 0.06, 0.05, "read") == "cpu"


def test_zero_turns_the_watchdog_off() -> None:
    async def body() -> None:
        with loopwatch.watching(0, name="off") as watch:
            assert watch is None

    _run(asyncio.new_event_loop, body)


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.settings import load_settings

    monkeypatch.setenv("EXAI_LOOP_STALL_MS", "50")
    assert load_settings().loop_stall_ms == 50
    monkeypatch.setenv("EXAI_LOOP_STALL_MS", "0")
    assert load_settings().loop_stall_ms == 0


async def test_the_fleets_processes_export_the_stall_metrics(fleet: Any) -> None:
    """The router's /metrics and an instance's /internal/metrics carry the watchdog's counters
    (the test fleets run it at 50 ms)."""
    import aiohttp

    from common.protocol import INTERNAL_METRICS, INTERNAL_TOKEN_HEADER

    status, text = await fleet.admin("GET", "/metrics")
    assert status == 200
    assert "# TYPE exai_event_loop_stalls_total counter" in text
    assert "exai_event_loop_longest_stall_seconds " in text
    url = f"http://127.0.0.1:{fleet.instance_port(1)}{INTERNAL_METRICS}"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={INTERNAL_TOKEN_HEADER: fleet.internal_token}) as resp,
    ):
        assert resp.status == 200
        body = await resp.text()
    assert "# TYPE exai_event_loop_stalls_total counter" in body
    assert "exai_event_loop_longest_stall_seconds " in body


def _holds_the_gil() -> None:
    """C code that keeps the GIL: the watchdog's thread cannot even run until it returns."""
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        sum(range(3_000_000))  # one C call of tens of milliseconds, no GIL switch inside


@pytest.mark.parametrize("flavour", sorted(LOOPS))
def test_c_code_holding_the_gil_on_the_loop_is_reported_with_the_caller(flavour: str) -> None:
    watches: list[LoopWatch] = []

    async def body() -> None:
        # A short interval: the thread's wake-ups fall inside the blocking call for sure.
        watch = LoopWatch(0.05, name="gil-loop", interval=0.05).start()
        watches.append(watch)
        await asyncio.sleep(0.25)
        _holds_the_gil()
        await asyncio.sleep(0.3)
        _wait_for(watch, 1)
        watch.stop(join=2)

    _run(LOOPS[flavour], body)
    stalls = list(watches[0].recent)
    assert stalls, "a loop held by C code for 0.5 s was not reported"
    assert any(s.kind == "cpu" and "_holds_the_gil" in "".join(s.stack) for s in stalls), stalls


def test_the_test_report_reads_stalls_from_a_programs_log(tmp_path: Any) -> None:
    """tests/loopstalls.py finds each warning with its stack, and tells the project's blocking
    from the machine's."""
    from tests import loopstalls

    blocked = Stall(
        seconds=0.3,
        cpu_seconds=0.001,
        stack=('  File "/x/instance/tools/info.py", line 9, in version\n    read()\n',),
        kind="blocked",
        syscall="read",
        gil_held=False,
        full_gc=False,
        in_project=True,
    )
    idle = Stall(
        seconds=0.08,
        cpu_seconds=0.0,
        stack=('  File "/x/instance/main.py", line 39, in _serve\n    runner.run()\n',),
        kind="idle",
        syscall="epoll_wait",
        gil_held=False,
        full_gc=False,
        in_project=False,
    )
    head = "2026-01-01 00:00:01,000 WARNING instance_01 exai.loopwatch: "
    (tmp_path / "instance_01.log").write_text(
        "2026-01-01 00:00:00,000 INFO instance_01 x: ready\n"
        f"{head}{blocked.describe('instance_01', 0.05)}\n"
        f"{head}{idle.describe('instance_01', 0.05)}\n"
        "2026-01-01 00:00:03,000 INFO instance_01 x: stopping\n"
    )
    found = loopstalls.read_stalls(tmp_path, "t")
    assert [(s.who, s.ms, s.kind, s.real) for s in found] == [
        ("instance_01", 300, "blocked", True),
        ("instance_01", 80, "idle", False),
    ]
    assert "info.py" in found[0].text and "stopping" not in found[1].text


def test_the_audit_names_a_file_opened_on_the_loop_once_per_place(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f.txt"
    path.write_text("x")
    offs: list[Callable[[], None]] = []

    def read_on_the_loop() -> str:
        return path.read_text()  # a short blocking read: no stall, but the audit sees it

    async def body() -> None:
        offs.append(loopwatch.audit_blocking_calls(name="audited"))
        for _ in range(3):
            read_on_the_loop()
        await asyncio.to_thread(path.read_text)  # off the loop: not reported
        with open("/dev/null", "rb"):  # noqa: ASYNC230  # a device that never blocks: not reported
            pass

    try:
        with caplog.at_level(logging.WARNING, logger="exai.loopwatch"):
            _run(asyncio.new_event_loop, body)
    finally:
        for off in offs:
            off()
    reports = [r.getMessage() for r in caplog.records if loopwatch.BLOCKING_MARKER in r.getMessage()]
    assert len(reports) == 1, reports
    assert "of audited: open" in reports[0] and "read_on_the_loop" in reports[0]


def test_the_processes_load_the_idna_codec_at_start_not_on_their_first_connection() -> None:
    """Found by EXAI_LOOP_AUDIT: the first outgoing connection imported `encodings.idna` (files
    read from disk) on the event loop. common/eventloop.py, which both processes import at
    start, loads it."""
    import subprocess

    code = "import sys, common.eventloop; print('encodings.idna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
