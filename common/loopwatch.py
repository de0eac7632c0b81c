"""A watchdog that names whatever blocks a process's event loop.

The fleet's first rule is that nothing blocks an event loop; a violation (a file read, a
subprocess, a slow import at first use, a long computation) shows up only as latency on every
call that waited behind it. This module catches it where it happens: a daemon thread probes the
loop a few times per second (`call_soon_threadsafe` of a callback that sets an event) and, when
the probe has not run after the threshold, takes the loop thread's Python stack at that moment
(`sys._current_frames()`), waits for the loop to turn again, then logs one warning naming the
stall's length, the CPU the loop thread spent meanwhile, and the stack, and counts it for the
process's metrics (`exai_event_loop_stalls_total`, `exai_event_loop_longest_stall_seconds`).

Nothing runs per request: the cost is one probe per interval (a callback on the loop and a
wake-up of this thread, a few microseconds), and works the same on uvloop, which ignores asyncio's
debug mode. A probe is sent every max(threshold, MIN_INTERVAL) seconds, so a stall
longer than threshold + interval is always caught; a shorter one is caught when a probe falls
into it (a stall that repeats is caught soon enough).

The verdict on each stall (`Stall.kind`) separates the machine from the code:
- "idle": the loop thread was inside the loop's own machinery (its poll, its timer heap):
  the process did not get the CPU in time (a loaded machine), nothing to fix in the code;
- "cpu": the loop thread spent at least the threshold (or half the stall) on the CPU: work
  done on the loop (its own CPU time, which a loaded machine does not inflate);
- "blocked": the loop thread was off the CPU inside a system call when the stall was found
  (Linux: /proc/self/task/<tid>/syscall names it: a disk read, a subprocess wait, a sleep,
  a DNS lookup's socket, a lock): a blocking call in the code shown;
- "preempted": off the CPU but in no system call (or only waiting to take the GIL back from
  this thread), with little CPU used: the machine gave the loop thread no CPU in ordinary
  code; nothing to fix there either.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import platform
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("exai.loopwatch")

MIN_INTERVAL = 0.2
"""Shortest time between two probes (seconds): at most five probes a second. Each costs the
process two wake-ups of this thread and one of the loop (tens of microseconds of CPU on a
loaded 2-core VM); a stall longer than threshold + interval is always caught."""

LONG_STALL = 10.0
"""A loop still stalled after this long is reported at once (it may never turn again)."""

GIL_SLACK = 0.02
"""How late this thread may wake before it concludes the GIL was held (seconds)."""

RECENT = 64
"""Stalls kept in memory with their stacks (for tests and the report)."""

STALL_MARKER = "event loop stalled"
"""The words that start each stall warning (tests/loopstalls.py finds the reports by them)."""

_PROJECT = Path(__file__).resolve().parent.parent
_PACKAGES = tuple(str(_PROJECT / p) + "/" for p in ("common", "router", "instance"))
_ENTRIES = tuple(str(_PROJECT / p) for p in ("router/main.py", "instance/main.py", "common/entry.py"))
"""The processes' entry points: the bottom of every stack, not a place that blocks."""
_IDLE_FRAMES = {
    ("runners.py", "run"),
    ("base_events.py", "run_forever"),
    ("base_events.py", "run_until_complete"),
    ("base_events.py", "_run_once"),
    ("selectors.py", "select"),
}

Kind = Literal["idle", "cpu", "blocked", "preempted"]

# x86-64 numbers of the system calls a blocked loop thread is most likely found in.
_SYSCALLS = {
    0: "read", 1: "write", 2: "open", 3: "close", 4: "stat", 5: "fstat", 6: "lstat", 7: "poll",
    8: "lseek", 9: "mmap", 11: "munmap", 17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev",
    23: "select", 35: "nanosleep", 42: "connect", 43: "accept", 44: "sendto", 45: "recvfrom",
    46: "sendmsg", 47: "recvmsg", 56: "clone", 57: "fork", 58: "vfork", 59: "execve", 61: "wait4",
    72: "fcntl", 74: "fsync", 75: "fdatasync", 76: "truncate", 77: "ftruncate", 82: "rename",
    87: "unlink", 202: "futex", 217: "getdents64", 230: "clock_nanosleep", 232: "epoll_wait",
    257: "openat", 262: "newfstatat", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
    285: "fallocate", 316: "renameat2", 332: "statx", 435: "clone3", 441: "epoll_pwait2",
}  # fmt: skip
_LOCK_FILES = ("threading.py", "queue.py")
_X86_64 = platform.machine() in ("x86_64", "AMD64")


@dataclass(frozen=True)
class Stall:
    """One stall: how long the loop did not turn, the loop thread's CPU meanwhile, and where it was."""

    seconds: float  # from the probe that found it to the loop's next turn: a lower bound
    cpu_seconds: float
    stack: tuple[str, ...]  # formatted frames, outermost first, as traceback.format_stack gives
    kind: Kind
    syscall: str  # what the loop thread was in when found: a system call's name, "running" or ""
    gil_held: bool  # the watchdog could not run during it: the stack was taken once the GIL was free
    full_gc: bool  # a full (generation 2) garbage collection ran during it
    in_project: bool  # a frame is the project's own code (common/, router/, instance/; not main.py)

    def describe(self, name: str, threshold: float) -> str:
        how = {
            "idle": "in the loop's own machinery: the process did not get the CPU in time",
            "cpu": "working on the CPU",
            "blocked": f"in the system call {self.syscall}: a blocking call",
            "preempted": "in ordinary code, not given the CPU by the machine",
        }[self.kind]
        gc_note = "; a full garbage collection ran meanwhile" if self.full_gc else ""
        if self.gil_held:
            gc_note += (
                "; the GIL was held throughout (C code that does not release it), so the stack "
                "was taken just after: the blocking call is the last one made before this point"
            )
        head = (
            f"{STALL_MARKER}: {name} did not turn for at least {self.seconds * 1000:.0f} ms "
            f"(threshold {threshold * 1000:.0f} ms; loop thread CPU {self.cpu_seconds * 1000:.0f} ms, "
            f"kind={self.kind}: {how}{gc_note}); the loop thread was at:"
        )
        return head + "\n" + "".join(self.stack).rstrip("\n")


def classify(
    frames: list[traceback.FrameSummary], seconds: float, cpu_seconds: float, threshold: float, syscall: str
) -> Kind:
    """The verdict on a stall from its stack, the loop thread's CPU and the system call it was
    in when found (see the module docstring)."""
    inner = Path(frames[-1].filename).name if frames else ""
    if cpu_seconds >= min(threshold, seconds / 2):
        return "cpu"  # the loop thread's own CPU time: work, wherever its stack is by now
    if frames and (inner, frames[-1].name) in _IDLE_FRAMES:
        return "idle"
    if syscall == "futex":  # a lock of the code's own, or only the GIL this thread asked for
        return "blocked" if inner in _LOCK_FILES else "preempted"
    if syscall in ("", "running"):
        return "preempted"
    return "blocked"


def _run_delay(fd: int) -> float:
    """Seconds a thread has spent runnable but waiting for a CPU, from its open schedstat file
    (Linux; 0 elsewhere). One pread of a kept-open file: a few microseconds."""
    if fd < 0:
        return 0.0
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _open_schedstat() -> int:
    try:
        return os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        return -1


def _syscall_of(native_id: int) -> str:
    """The system call a thread of this process is in right now ("running" when it is in none;
    "" where /proc cannot tell). Read by the watchdog thread only, never on the loop."""
    try:
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            first = f.read().split(maxsplit=1)[0]
    except (OSError, IndexError):
        return ""
    if not first.lstrip("-").isdigit():
        return first  # "running"
    number = int(first)
    if number < 0:
        return "running"
    return _SYSCALLS.get(number, f"syscall {number}") if _X86_64 else f"syscall {number}"


class LoopWatch:
    """The watchdog of one event loop. Start it from the loop's own thread (`start`)."""

    def __init__(self, threshold: float, *, name: str, interval: float | None = None) -> None:
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        self.threshold = threshold
        self.interval = interval if interval is not None else max(threshold, MIN_INTERVAL)
        self.name = name
        self.stalls_total = 0
        self.longest_seconds = 0.0
        self.recent: deque[Stall] = deque(maxlen=RECENT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._loop_native = 0
        self._cpu_clock: int | None = None
        self._ack = threading.Event()
        self._acked_at = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> LoopWatch:
        """Watch `loop` (default: the running one); call from the thread that runs it."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._loop_native = threading.get_native_id()
        with contextlib.suppress(AttributeError, OSError):  # not every platform has thread clocks
            self._cpu_clock = time.pthread_getcpuclockid(self._loop_thread)
        self._thread = threading.Thread(target=self._run, name=f"loopwatch-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, join: float | None = None) -> None:
        """Stop the thread (it exits at its next wake-up); `join` waits that long for it (tests)."""
        self._stopping.set()
        self._ack.set()
        if join is not None and self._thread is not None:
            self._thread.join(join)

    # --- the watchdog thread ------------------------------------------------------------------
    def _cpu(self) -> float:
        if self._cpu_clock is None:
            return 0.0
        try:
            return time.clock_gettime(self._cpu_clock)
        except OSError:  # the loop thread is gone
            return 0.0

    def _probe(self) -> None:
        """Runs on the loop: the loop turned. Records when, for a stall the thread could not see."""
        self._acked_at = time.monotonic()
        self._ack.set()

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        own = _open_schedstat()
        try:
            self._watch(loop, own)
        finally:
            if own >= 0:
                os.close(own)

    def _watch(self, loop: asyncio.AbstractEventLoop, own: int) -> None:
        ack, stopping = self._ack, self._stopping
        slept_at, cpu_mark, queued = time.monotonic(), self._cpu(), _run_delay(own)
        while not stopping.wait(self.interval):
            late = time.monotonic() - slept_at - self.interval
            if late > self.threshold:
                self._check_late(late, self._cpu() - cpu_mark, _run_delay(own) - queued)
            ack.clear()
            sent, cpu_before = time.monotonic(), self._cpu()
            full_gcs = gc.get_stats()[2]["collections"]
            try:
                loop.call_soon_threadsafe(self._probe)
            except RuntimeError:  # the loop is closed
                return
            acked = ack.wait(self.threshold)
            woke = time.monotonic()
            if stopping.is_set():
                return
            if acked and self._acked_at - sent <= self.threshold:
                slept_at, cpu_mark, queued = time.monotonic(), self._cpu(), _run_delay(own)
                continue
            # The loop has not turned for `threshold`: where is its thread right now? When this
            # thread itself woke late, something held the GIL meanwhile (C code that does not
            # let go of it): the loop thread has only just let go, right after the blocking call.
            gil_held = woke - sent > self.threshold + GIL_SLACK
            syscall = "" if gil_held else _syscall_of(self._loop_native)
            frame = sys._current_frames().get(self._loop_thread)
            frames = traceback.extract_stack(frame) if frame is not None else traceback.StackSummary()
            reported_long = False
            while not ack.wait(LONG_STALL):
                if not reported_long:
                    reported_long = True
                    log.warning(
                        "%s: %s has not turned for %.0f s; the loop thread is at:\n%s",
                        STALL_MARKER,
                        self.name,
                        time.monotonic() - sent,
                        "".join(frames.format()).rstrip("\n"),
                    )
            if stopping.is_set():
                return
            seconds = self._acked_at - sent
            self._record(frames, seconds, self._cpu() - cpu_before, full_gcs, syscall, gil_held)
            slept_at, cpu_mark, queued = time.monotonic(), self._cpu(), _run_delay(own)

    def _check_late(self, late: float, cpu: float, queued: float) -> None:
        """This thread woke `late` seconds after it asked to. Waiting in the CPU's run queue
        (`queued`) is the machine; otherwise it waited for the GIL, which C code held without a
        probe pending (a tokenizer's first text, a big regex, a C library call): when the loop
        thread spent that time on the CPU, it was the one holding it, and it has only just let
        go, so its stack is right after the blocking call."""
        if queued >= late / 2 or cpu < late / 2:
            return
        frame = sys._current_frames().get(self._loop_thread)
        frames = traceback.extract_stack(frame) if frame is not None else traceback.StackSummary()
        self._record(frames, late, cpu, gc.get_stats()[2]["collections"], "", True)

    def _record(
        self,
        frames: traceback.StackSummary,
        seconds: float,
        cpu: float,
        full_gcs: int,
        syscall: str,
        gil_held: bool,
    ) -> None:
        stall = Stall(
            seconds=seconds,
            cpu_seconds=max(0.0, cpu),
            stack=tuple(frames.format()),
            kind=classify(list(frames), seconds, cpu, self.threshold, syscall),
            syscall=syscall,
            gil_held=gil_held,
            full_gc=gc.get_stats()[2]["collections"] != full_gcs,
            in_project=any(
                f.filename.startswith(_PACKAGES) and not f.filename.startswith(_ENTRIES) for f in frames
            ),
        )
        self.recent.append(stall)
        self.stalls_total += 1
        self.longest_seconds = max(self.longest_seconds, seconds)
        log.warning("%s", stall.describe(self.name, self.threshold))

    # --- metrics ---------------------------------------------------------------------------
    def render(self) -> str:
        """The watchdog's metrics in the Prometheus text format."""
        return (
            "# HELP exai_event_loop_stalls_total Times the event loop did not turn for longer than "
            "EXAI_LOOP_STALL_MS (each one is logged with the blocking stack).\n"
            "# TYPE exai_event_loop_stalls_total counter\n"
            f"exai_event_loop_stalls_total {self.stalls_total}\n"
            "# HELP exai_event_loop_longest_stall_seconds Longest event loop stall seen by this process.\n"
            "# TYPE exai_event_loop_longest_stall_seconds gauge\n"
            f"exai_event_loop_longest_stall_seconds {self.longest_seconds:.6f}\n"
        )


BLOCKING_MARKER = "blocking call on the event loop"
"""The words that start each audit warning (EXAI_LOOP_AUDIT; tests/loopstalls.py finds them)."""

AUDIT_EVENTS = frozenset(
    {
        "open",  # builtins.open, io.open, os.open: a disk read or write follows
        "import",  # a module loaded at first use: its files read and its code run
        "os.listdir",
        "os.scandir",
        "os.system",
        "subprocess.Popen",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "shutil.copyfile",
        "shutil.rmtree",
        "sqlite3.connect",
    }
)
"""Audit events (sys.audit) that mean blocking I/O when they happen on the loop's thread."""

_NEVER_BLOCK = frozenset({"/dev/null", b"/dev/null"})
"""Paths whose opening is not disk I/O (asyncio's subprocess opens /dev/null for DEVNULL)."""


def audit_blocking_calls(*, name: str) -> Callable[[], None]:
    """Diagnostics (EXAI_LOOP_AUDIT): log, once per place, every file open, module import,
    subprocess and name lookup made on this thread while its event loop runs, even the ones
    too short to stall it past the threshold. A Python audit hook sees every audit event of
    the process (a set lookup each), and cannot be removed (the function returned turns it
    off): for tests and investigations."""
    loop_thread = threading.get_ident()
    seen: set[tuple[str, str, int]] = set()
    busy = False

    def hook(event: str, args: tuple[object, ...]) -> None:
        nonlocal busy
        if event not in AUDIT_EVENTS or busy or not on or threading.get_ident() != loop_thread:
            return
        if asyncio._get_running_loop() is None:
            return
        if event == "open" and args and args[0] in _NEVER_BLOCK:
            return  # a character device that answers at once (a subprocess's stdin, ...)
        busy = True  # formatting the stack opens source files: not reported again
        try:
            frames = traceback.extract_stack(sys._getframe(1))
            ours = [f for f in frames if f.filename.startswith(_PACKAGES)] or frames
            site = (event, ours[-1].filename, ours[-1].lineno or 0)
            if site in seen:
                return
            seen.add(site)
            what = args[0] if args else ""
            log.warning(
                "%s of %s: %s %r at:\n%s",
                BLOCKING_MARKER,
                name,
                event,
                what,
                "".join(frames.format()).rstrip("\n"),
            )
        finally:
            busy = False

    on = True

    def off() -> None:
        nonlocal on
        on = False

    sys.addaudithook(hook)
    return off


_current: LoopWatch | None = None


def current() -> LoopWatch | None:
    """The process's watchdog, once one was started (kept after it stops, for its counts)."""
    return _current


def render_metrics() -> str:
    """The process's watchdog metrics, or nothing when it is off."""
    return _current.render() if _current is not None else ""


def start(stall_ms: float, *, name: str, audit: bool = False) -> LoopWatch | None:
    """Watch the running loop from now on (stall_ms 0: off, returns None); `stop()` the result.
    `audit` also reports every blocking call on it, however short (`audit_blocking_calls`)."""
    global _current
    if audit:
        audit_blocking_calls(name=name)
    if stall_ms <= 0:
        return None
    watch = LoopWatch(stall_ms / 1000, name=name).start()
    _current = watch
    log.debug("watching the event loop for stalls over %g ms", stall_ms)
    return watch


@contextlib.contextmanager
def watching(stall_ms: float, *, name: str, audit: bool = False) -> Iterator[LoopWatch | None]:
    """Watch the running loop for the block's duration (stall_ms 0: off, yields None)."""
    watch = start(stall_ms, name=name, audit=audit)
    try:
        yield watch
    finally:
        if watch is not None:
            watch.stop()
