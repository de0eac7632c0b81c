"""The local write-behind spool: a SQLite file in WAL mode, written with group commit.

Why SQLite: it gives crash-safe appends (a torn write at kill -9 is rolled back, never half
read), cheap deletion of flushed rows, and an index by thread for "read your own pending
writes" — all in the standard library. Every call runs on one dedicated thread, so the event
loop never blocks on disk. Appends that arrive within `fsync_window_ms` of each other share one
transaction and therefore one fsync (`synchronous=FULL`): an append returns only when its row is
durable. Deletes of flushed rows are not fsynced (`synchronous=NORMAL`): losing one in a crash
only means a replay, and replays are idempotent in Postgres.

An append may ask for `sync="normal"` instead: its transaction is committed without the fsync
(the row is in the operating system's cache, so it survives a kill -9 of this process but not
a power loss or a kernel crash), the caller is answered, and the WAL is fsync'd right after on
a thread of its own (the next commit does not wait for it). The spool's thread asks for that
fsync itself, the moment it has committed: the event loop does no work for it (no task, no
executor hand-off, no wake-up when it is done). Link events use it when
EXAI_LINK_SPOOL_SYNC=normal, chat exchanges when EXAI_CHAT_SPOOL_SYNC=normal (the default).

An append can carry `on_commit`, called on the event loop once its row is committed (with
`sync="normal"`: in the operating system, kill -9 safe; with `"full"`: fsync'd), before any
caller of the batch is resumed; and `before_commit`, called once the row is admitted, just
before it goes to the spool's thread: a live link event (sync="normal") is announced from
there, so Redis, the router and the members' clients do their part while the row is being
committed (its announcement only wakes readers, who wait for the event to be stored).

The commit path is short for a live append (`urgent`, e.g. a link event): `append` hands the row
(with whatever is queued before it, so the order holds) to the spool's thread itself, without
a turn of the loop for the commit loop; the thread commits every batch handed to it so far in
one transaction and wakes the loop once (`call_soon_threadsafe`), where one callback answers
the batch: `on_commit` first, then the callers, then the flusher. No task or future chain sits
between the commit and the announcement.

Rows of the "hot" kinds (link events: someone is waiting for them live) are also kept in memory
once committed, up to `hot_max` rows, so the flusher can take them at once without reading the
file (`hot_batch`). The copy is only used while it holds every unflushed row of those kinds, so
they still reach Postgres in append order; after an overflow, or rows left by a previous run,
the flusher reads the file until none of them is left.

A full spool is never a silent drop: the configured policy either blocks the caller until the
flusher frees space (up to a timeout) or refuses with SpoolFull, and both are logged loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from common import jsonbytes
from common.errors import SpoolFull, StorageError
from instance.timing import Stage

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    kind      TEXT NOT NULL,
    thread_id TEXT,
    created   REAL NOT NULL,
    payload   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_thread_idx ON spool (thread_id) WHERE thread_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead (
    seq       INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL,
    thread_id TEXT,
    created   REAL NOT NULL,
    payload   BLOB NOT NULL,
    error     TEXT NOT NULL,
    failed_at REAL NOT NULL
);
"""
_INSERT = "INSERT INTO spool (kind, thread_id, created, payload) VALUES (?, ?, ?, ?)"
_DEAD_INSERT = (
    "INSERT OR IGNORE INTO dead (seq, kind, thread_id, created, payload, error, failed_at)"
    " SELECT seq, kind, thread_id, created, payload, ?, ? FROM spool WHERE seq = ?"
)


class SpoolEntry:
    """One spooled row: `kind` says which Postgres table it becomes.

    The row keeps its JSON as stored (`blob`) and decodes it only when `payload` is first read:
    the flusher hands most rows to Postgres as they are (instance/storage/writebehind.py), so
    it neither decodes nor re-encodes them. Made from a payload instead, it encodes on demand.
    """

    __slots__ = ("_blob", "_payload", "created", "kind", "seq", "size", "thread_id")

    def __init__(
        self,
        seq: int,
        kind: str,
        thread_id: str | None,
        created: float,
        payload: dict[str, Any] | None = None,
        size: int = 0,
        *,
        blob: bytes | None = None,
    ) -> None:
        if payload is None and blob is None:
            raise ValueError("a spool entry needs its payload or its JSON")
        self.seq = seq
        self.kind = kind
        self.thread_id = thread_id
        self.created = created
        self.size = size
        self._blob = blob
        self._payload = payload

    @property
    def payload(self) -> dict[str, Any]:
        """The row's fields (decoded from its JSON on first use)."""
        if self._payload is None:
            assert self._blob is not None
            self._payload = json.loads(self._blob)
        return self._payload

    @property
    def blob(self) -> bytes:
        """The row's JSON, UTF-8, as the spool stores it."""
        if self._blob is None:
            self._blob = encode_payload(self.payload)
        return self._blob

    def with_blob(self, blob: bytes) -> SpoolEntry:
        """This row with other JSON (a field filled in before it is stored); its size, which
        the spool counts, stays the stored row's."""
        return SpoolEntry(self.seq, self.kind, self.thread_id, self.created, size=self.size, blob=blob)

    def __repr__(self) -> str:
        return f"SpoolEntry(seq={self.seq}, kind={self.kind!r}, thread={self.thread_id!r}, size={self.size})"


def encode_payload(payload: dict[str, Any]) -> bytes:
    """A payload as the spool stores it: compact JSON, UTF-8 (common/jsonbytes.py)."""
    return jsonbytes.dumps(payload)


@dataclass(slots=True)
class _Pending:
    kind: str
    thread_id: str | None
    created: float
    blob: bytes
    future: asyncio.Future[None]
    full: bool = True  # fsync before answering (else: answer after the OS write, fsync after)
    on_commit: Callable[[], None] | None = None  # called once the row is committed


class Spool:
    """Append-only, durable, bounded queue of rows waiting for Postgres."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        full_policy: Literal["block", "refuse"] = "block",
        block_timeout: float = 30.0,
        fsync_window_ms: float = 2.0,
        hot_kinds: Collection[str] = (),
        hot_max: int = 1000,
        fault_file: Path | None = None,
    ) -> None:
        self.directory = directory
        self.path = directory / "spool.sqlite3"
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.block_timeout = block_timeout
        self.fsync_window = fsync_window_ms / 1000.0
        self.fault_file = fault_file  # TEST ONLY (EXAI_TEST_SPOOL_FAULT_FILE): `_test_fault`
        self._worker = _Worker("exai-spool")
        # The fsync after sync="normal" commits: asked for by the spool's thread (`_want_fsync`),
        # run by a thread of its own (`_fsync_run`); both sides hold `_fsync_cond` briefly.
        self._fsync_cond = threading.Condition()
        self._fsync_asked = 0  # sync="normal" commits so far
        self._fsync_covered = 0  # of which the last finished fsync covers this many
        self._fsync_since: float | None = None  # commit time of the oldest one not covered yet
        self._fsync_stop = False
        self._fsync_thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        # A second connection to the same file, set to synchronous=NORMAL once, for sync="normal"
        # commits: one statement each (a lone INSERT commits itself) instead of five (the pragma
        # set and reset, BEGIN, INSERT, COMMIT). Every statement releases and retakes the GIL, and
        # with the loop busy (the announcement's reply, the sender's answer) each retake waits.
        self._db_normal: sqlite3.Connection | None = None
        self._lockfile: IO[str] | None = None
        # Counters of committed, not yet flushed rows (kept in memory so stats never touch disk).
        self.rows = 0
        self.bytes = 0
        self.oldest: float | None = None
        self.dead_rows = 0
        self.refused_total = 0
        self.blocked_total = 0
        self.commits_total = 0  # fsync'd transactions; appends_total / commits_total = group size
        self.appends_total = 0
        self._threads: Counter[str] = Counter()
        self._reserved = 0
        self._queue: list[_Pending] = []
        self._queued = asyncio.Event()
        self._grown = asyncio.Event()
        self._group_target = 0
        # Batches handed to the spool's thread, oldest first (`_hand_off`; a deque: appended on
        # the loop, taken on the thread).
        self._handoff: deque[tuple[list[_Pending], asyncio.Future[None] | None]] = deque()
        self._in_flight = 0  # batches handed off and not answered yet
        self._space = asyncio.Event()
        self._empty = asyncio.Event()
        self._full_episode = False
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self.on_commit: Callable[[int, bool], None] | None = None  # (rows, hot rows among them)
        # Committed, unflushed rows of the hot kinds: how many, and their in-memory copy (by seq)
        # while it is complete (see the module docstring).
        self.hot_kinds = frozenset(hot_kinds)
        self.hot_max = hot_max
        self.hot_rows = 0
        self._hot: dict[int, SpoolEntry | _Pending] = {}
        self._hot_complete = True
        self.hot_taken_total = 0  # rows handed to the flusher from memory
        self.unsynced_commits = 0  # sync="normal" commits whose fsync came after the answer
        # From the oldest such commit to the end of the fsync that covered it: the power-loss
        # window of sync="normal" rows (stats: `unsynced_window`). Added to by the fsync thread:
        # read it under `_fsync_cond`.
        self.unsynced_window = Stage()

    # --- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (or recover) the spool file; rows left by a crashed process become the backlog."""
        await self._call(self._open_sync)
        self._fsync_stop = False
        self._fsync_thread = threading.Thread(target=self._fsync_run, name="exai-spool-sync", daemon=True)
        self._fsync_thread.start()
        if self.rows == 0:
            self._empty.set()
        self._committer = asyncio.create_task(self._commit_loop(), name="exai-spool-commit")
        if self.rows:
            log.warning(
                "spool %s holds %d rows (%d bytes) from a previous run; they will be flushed",
                self.path,
                self.rows,
                self.bytes,
            )

    def _open_sync(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lockfile = open(self.directory / "spool.lock", "a+")  # held until close
        try:
            fcntl.flock(lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lockfile.seek(0)
            owner = lockfile.read().strip() or "another process"
            lockfile.close()
            raise StorageError(
                f"the spool {self.directory} is in use by {owner}",
                hint="Each instance needs its own EXAI_INSTANCE_ID (the spool lives under its id).",
            ) from None
        lockfile.truncate(0)
        lockfile.write(f"pid {os.getpid()}\n")
        lockfile.flush()
        self._lockfile = lockfile
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        count, size, oldest = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), min(created) FROM spool"
        ).fetchone()
        self.rows, self.bytes, self.oldest = int(count), int(size), oldest
        for thread_id, n in db.execute(
            "SELECT thread_id, count(*) FROM spool WHERE thread_id IS NOT NULL GROUP BY thread_id"
        ):
            self._threads[thread_id] = int(n)
        self.dead_rows = int(db.execute("SELECT count(*) FROM dead").fetchone()[0])
        if self.hot_kinds:
            marks = ",".join("?" * len(self.hot_kinds))
            self.hot_rows = int(
                db.execute(
                    f"SELECT count(*) FROM spool WHERE kind IN ({marks})", tuple(self.hot_kinds)
                ).fetchone()[0]
            )
        self._hot_complete = self.hot_rows == 0  # rows of a previous run: read from the file
        normal = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        normal.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit is a write(), no fsync
        self._db = db
        self._db_normal = normal

    async def close(self) -> None:
        """Stop taking appends, commit what is queued, and close the file (unflushed rows stay)."""
        if self._closed:
            return
        self._closed = True
        self._space.set()  # writers blocked on a full spool wake up and are told it closed
        if self._committer is not None:
            self._queued.set()
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        if self._queue:  # appends that were waiting when close began still get their answer
            await self._commit(self._queue)
            self._queue = []
        # Batches handed off just before (urgent appends) are committed and answered first: the
        # thread runs jobs in order, and their callbacks reach the loop before this one returns.
        await self._call(_nothing)
        if self._fsync_thread is not None:  # the last fsync before the file closes
            with self._fsync_cond:
                self._fsync_stop = True
                self._fsync_cond.notify()
            await asyncio.to_thread(self._fsync_thread.join)
            self._fsync_thread = None
        await self._call(self._close_sync)
        self._worker.shutdown()

    def _close_sync(self) -> None:
        if self._db_normal is not None:
            self._db_normal.close()
            self._db_normal = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._worker.call(fn, *args)

    # --- appending -------------------------------------------------------------------------
    async def append(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        thread_id: str | None = None,
        urgent: bool = False,
        sync: Literal["full", "normal"] = "full",
        on_commit: Callable[[], None] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """Return once the row is fsync'd in the spool; apply the full-spool policy first.

        `urgent`: commit with what is queued now, without waiting `fsync_window_ms` for more
        writers (a caller that answers only once this row is durable, e.g. a link event).
        `sync="normal"`: return once the row is committed to the operating system (it survives
        a kill -9 of this process, not a power loss); the fsync follows at once.
        `on_commit`: called on the loop before this returns, once the row is committed (with
        `sync="normal"`) or fsync'd (with `sync="full"`); not if the write fails. It must not
        block.
        `before_commit`: called on the loop once the row is admitted (the full-spool policy
        passed), just before it goes to be committed: work that runs in parallel with the
        commit (a link event's announcement, sync="normal"). The row is not durable yet when it
        runs; if the write then fails, this raises as usual and the caller undoes that work.
        It must not block; if it raises, the write goes on.
        """
        await self.append_many(
            [(kind, payload)],
            thread_id=thread_id,
            urgent=urgent,
            sync=sync,
            on_commit=on_commit,
            before_commit=before_commit,
        )

    async def append_many(
        self,
        rows: Sequence[tuple[str, dict[str, Any] | bytes]],
        *,
        thread_id: str | None = None,
        urgent: bool = False,
        eager: bool = False,
        sync: Literal["full", "normal"] = "full",
        on_commit: Callable[[], None] | None = None,
        before_commit: Callable[[], None] | None = None,
        after_handoff: Callable[[], None] | None = None,
    ) -> None:
        """`append` for several (kind, payload) rows that belong together: queued at once, in this
        order, so they share one transaction (all committed or none) and the caller waits for
        one answer. A payload may come encoded already (its JSON, as bytes). `on_commit` is
        called once, with the last row; `before_commit` once, before the rows are queued.
        `eager`: `urgent` if the spool is idle (nothing queued, no transaction on its thread),
        so a lone writer does not wait for the commit loop's turns; otherwise the rows join the
        group being formed, as usual.
        `after_handoff`: called on the loop once the rows are queued (or handed to the spool's
        thread), before this waits for their commit: work that runs beside the commit. It
        must not block or raise."""
        if self._closed:
            raise StorageError("the spool is closed (the instance is shutting down); the write was not taken")
        blobs = [p if isinstance(p, bytes) else encode_payload(p) for _, p in rows]
        await self._admit(sum(len(b) for b in blobs))
        futures = self._enqueue(rows, blobs, thread_id, urgent, eager, sync, on_commit, before_commit)
        if after_handoff is not None:
            after_handoff()
        # One batch is answered in one callback (`_settle`): the last row's future is set last,
        # and a failure fails every row of the batch alike.
        for fut in futures[:-1]:
            fut.add_done_callback(_retrieve)
        await futures[-1]

    def submit(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        urgent: bool = False,
        sync: Literal["full", "normal"] = "full",
    ) -> asyncio.Future[None] | None:
        """`append` without a coroutine of its own, for a caller with other work to await first:
        the row is queued (and, `urgent`, handed to the spool's thread) now, and the returned
        future is set when it is committed (or fails as `append` would raise). None, with
        nothing queued, if the row cannot be admitted at once (the spool is full: `append`
        applies the full-spool policy)."""
        if self._closed:
            raise StorageError("the spool is closed (the instance is shutting down); the write was not taken")
        blob = encode_payload(payload)
        if not self._admit_now(len(blob)):
            return None
        return self._enqueue([(kind, payload)], [blob], None, urgent, False, sync, None, None)[-1]

    def _enqueue(
        self,
        rows: Sequence[tuple[str, dict[str, Any] | bytes]],
        blobs: list[bytes],
        thread_id: str | None,
        urgent: bool,
        eager: bool,
        sync: Literal["full", "normal"],
        on_commit: Callable[[], None] | None,
        before_commit: Callable[[], None] | None,
    ) -> list[asyncio.Future[None]]:
        """Queue admitted rows (their bytes reserved) for one transaction; their futures."""
        loop = asyncio.get_running_loop()
        now = time.time()
        full = sync != "normal"
        urgent = urgent or (eager and not self._queue and not self._in_flight)
        if before_commit is not None:
            try:
                before_commit()
            except Exception:
                log.exception("a spool before-commit callback failed (the row is still written)")
        futures: list[asyncio.Future[None]] = []
        for i, ((kind, _), blob) in enumerate(zip(rows, blobs, strict=True)):
            fut: asyncio.Future[None] = loop.create_future()
            last = i == len(rows) - 1
            self._queue.append(_Pending(kind, thread_id, now, blob, fut, full, on_commit if last else None))
            futures.append(fut)
        if urgent:
            # Handed to the spool's thread now, with whatever is queued before it (so the order
            # holds), without a turn of the loop for the commit loop first.
            batch, self._queue = self._queue, []
            self._hand_off(batch, None)
        else:
            self._queued.set()
            if self._group_target and len(self._queue) >= self._group_target:
                self._grown.set()
        return futures

    def _admit_now(self, size: int) -> bool:
        """Reserve `size` bytes if the spool has room now (False: it is full, nothing reserved)."""
        if size > self.max_bytes:
            raise SpoolFull(
                f"a single record of {size} bytes is larger than the whole spool ({self.max_bytes} bytes)",
                hint="Raise EXAI_SPOOL_MAX_BYTES or write a smaller record.",
            )
        if self.bytes + self._reserved + size <= self.max_bytes:
            self._reserved += size
            return True
        return False

    async def _admit(self, size: int) -> None:
        if self._admit_now(size):
            return
        used = self.bytes + self._reserved
        if self.full_policy == "refuse":
            self.refused_total += 1
            self._log_full(f"refusing writes ({used}/{self.max_bytes} bytes, {self.rows} rows pending)")
            raise SpoolFull(
                f"the write-behind spool is full ({used} of {self.max_bytes} bytes, {self.rows} rows waiting "
                "for Postgres); this write was refused and not stored"
            )
        self.blocked_total += 1
        self._log_full(f"blocking writers ({used}/{self.max_bytes} bytes, {self.rows} rows pending)")
        deadline = time.monotonic() + self.block_timeout
        while self.bytes + self._reserved + size > self.max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.refused_total += 1
                log.error("spool still full after blocking %.1fs: refusing a write", self.block_timeout)
                raise SpoolFull(
                    f"the write-behind spool stayed full for {self.block_timeout:.0f}s "
                    f"({self.bytes} of {self.max_bytes} bytes waiting for Postgres); "
                    "this write was not stored"
                )
            self._space.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._space.wait()
            if self._closed:
                raise StorageError("the spool closed while this write waited for space; it was not stored")
        self._reserved += size

    def _log_full(self, what: str) -> None:
        if not self._full_episode:
            self._full_episode = True
            log.error("SPOOL FULL at %s: %s (policy=%s)", self.path, what, self.full_policy)

    async def _commit_loop(self) -> None:
        """Group commit: one transaction (one fsync) for every append waiting at that moment.

        An append that finds the spool idle is committed at once (after one loop turn, so appends
        made in the same turn join it). Appends that arrive while an fsync is running form the
        next group. If the previous group was bigger than what is queued now (concurrent writers
        are active), wait up to `fsync_window_ms` for them to catch up rather than fsync twice.
        An urgent append does not come here: it hands itself (and what is queued before it)
        to the spool's thread at once (`append`).
        """
        last_group = 1
        while True:
            await self._queued.wait()
            await asyncio.sleep(0)  # appends made in this loop turn join the group
            if self.fsync_window > 0 and 0 < len(self._queue) < last_group:
                self._group_target = last_group
                self._grown.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.fsync_window):
                        await self._grown.wait()
                self._group_target = 0
            batch, self._queue = self._queue, []
            self._queued.clear()
            if batch:
                last_group = len(batch)
                await asyncio.shield(self._commit(batch))

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commit `batch` on the spool's thread and wait until its callers have their answer."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hand_off(batch, done)
        await done

    def _hand_off(self, batch: list[_Pending], done: asyncio.Future[None] | None) -> None:
        """Queue `batch` for the spool's thread, which commits it and calls `_committed` back on
        the loop once (one wake-up of the loop, no task between the commit and its callers).

        Batches are committed in the order they are handed off; the thread takes every batch
        waiting when it starts a transaction (those that came during the previous fsync share
        this one)."""
        self._handoff.append((batch, done))
        self._in_flight += 1
        self._worker.submit(self._write_batches, asyncio.get_running_loop())

    def _write_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the spool's thread: commit the batches handed off so far in one transaction."""
        taken: list[tuple[list[_Pending], asyncio.Future[None] | None]] = []
        while self._handoff:
            taken.append(self._handoff.popleft())
        if not taken:
            return  # an earlier call took them
        pending = [p for batch, _ in taken for p in batch]
        full = any(p.full for p in pending)
        rows = [(p.kind, p.thread_id, p.created, p.blob) for p in pending]
        seqs: list[int] = []
        error: Exception | None = None
        try:
            if self.fault_file is not None:
                self._test_fault(self.fault_file)
            seqs = self._insert_sync(rows, full)
        except Exception as exc:  # disk full, I/O error, ...: every waiting caller must get an answer
            error = exc
        committed_at = time.perf_counter()
        dones = [d for _, d in taken if d is not None]
        try:  # the loop first: its callers' answer is what the commit costs them
            loop.call_soon_threadsafe(self._committed, pending, seqs, error, full, dones, len(taken))
        except RuntimeError:  # the loop is closed: nobody is left to answer
            pass
        if error is None and not full:  # the callers are being answered; the fsync starts at once
            self._want_fsync(committed_at)

    def _committed(
        self,
        batch: list[_Pending],
        seqs: list[int],
        error: Exception | None,
        full: bool,
        dones: list[asyncio.Future[None]],
        batches: int = 1,
    ) -> None:
        """On the loop, once per transaction: the rows are committed (or failed); act on it."""
        self._in_flight -= batches
        try:
            self._settle(batch, seqs, error, full)
        finally:
            for d in dones:
                if not d.done():
                    d.set_result(None)

    def _settle(self, batch: list[_Pending], seqs: list[int], error: Exception | None, full: bool) -> None:
        size = sum(len(p.blob) for p in batch)
        self._reserved -= size
        if error is not None:
            log.error("cannot write to the spool %s: %s", self.path, error)
            err = StorageError(
                f"could not write to the local spool {self.path}: {error}; the write was not stored",
                hint="Check free disk space and permissions of EXAI_STATE_DIR.",
            )
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        self.commits_total += 1
        self.appends_total += len(batch)
        self.rows += len(batch)
        self.bytes += size
        if self.oldest is None:
            self.oldest = batch[0].created
        hot = 0
        for p, seq in zip(batch, seqs, strict=True):
            if p.thread_id is not None:
                self._threads[p.thread_id] += 1
            if p.kind in self.hot_kinds:
                hot += 1
                self.hot_rows += 1
                if self._hot_complete:
                    self._hot[seq] = p  # decoded when the flusher takes it
        if self._hot_complete and len(self._hot) > self.hot_max:
            log.info(
                "more than %d link rows wait for Postgres; the flusher reads them from the file", self.hot_max
            )
            self._hot.clear()
            self._hot_complete = False
        self._empty.clear()
        for p in batch:  # whoever acts on the commit (a link event's announcement) first
            if p.on_commit is not None:
                try:
                    p.on_commit()
                except Exception:
                    log.exception("a spool commit callback failed (the row is committed)")
        for p in batch:
            if not p.future.done():
                p.future.set_result(None)
        # The callers first (their answer is what a write costs them; a live link event is
        # announced from there), then the flusher: its wake-up is queued behind theirs.
        if self.on_commit is not None:
            asyncio.get_running_loop().call_soon(self.on_commit, self.rows, hot > 0)
        if not full:  # its fsync was asked for by the spool's thread (`_want_fsync`)
            self.unsynced_commits += 1

    def _want_fsync(self, committed_at: float) -> None:
        """On the spool's thread, after a sync="normal" commit: wake the fsync thread."""
        with self._fsync_cond:
            self._fsync_asked += 1
            if self._fsync_since is None:
                self._fsync_since = committed_at
            self._fsync_cond.notify()

    def _fsync_run(self) -> None:
        """The fsync thread: fsync the WAL after `sync="normal"` commits, on a thread of its own so
        the next commit does not wait for it; commits made during one fsync get the next. Stops
        (`close`) once every commit asked for is covered."""
        cond = self._fsync_cond
        while True:
            with cond:
                while self._fsync_asked == self._fsync_covered and not self._fsync_stop:
                    cond.wait()
                if self._fsync_asked == self._fsync_covered:
                    return
                target, since, self._fsync_since = self._fsync_asked, self._fsync_since, None
            window: float | None = None
            try:
                self._fsync_wal_sync()
            except OSError as exc:  # the rows are committed (kill -9 safe); say it loudly
                log.error("fsync of the spool WAL %s failed: %s", self.path, exc)
            except Exception:
                log.exception("fsync of the spool WAL %s failed", self.path)
            else:
                if since is not None:  # how long committed rows were exposed to a power loss
                    window = time.perf_counter() - since
            with cond:
                self._fsync_covered = target
                if window is not None:
                    self.unsynced_window.add(window)

    @staticmethod
    def _test_fault(path: Path) -> None:
        """TEST ONLY, on the spool's thread before a commit: what `path` says, while it exists
        ("fail": the commit fails as on a disk error; "delay SECONDS": it waits that long)."""
        try:
            order = path.read_text().split()
        except FileNotFoundError:
            return
        if order[:1] == ["fail"]:
            raise OSError(f"test fault from {path}")
        if order[:1] == ["delay"] and len(order) > 1:
            time.sleep(float(order[1]))

    def _insert_sync(self, rows: list[tuple[str, str | None, float, bytes]], full: bool = True) -> list[int]:
        """Insert the rows in one transaction; their seqs, in order."""
        db = self._require_db() if full else self._require_normal()
        if len(rows) == 1:  # a lone statement is its own transaction (autocommit)
            return [int(db.execute(_INSERT, rows[0]).lastrowid or 0)]
        db.execute("BEGIN IMMEDIATE")
        try:
            seqs = [int(db.execute(_INSERT, row).lastrowid or 0) for row in rows]
            db.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'd before this returns
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return seqs

    def _fsync_wal_sync(self) -> None:
        """Make the WAL's committed frames power-loss safe. fdatasync, as SQLite's own commit
        does: the frames and the file's size, not its timestamps, so an ext4 journal commit is
        only needed when the WAL grew (it is rewritten in place after each checkpoint)."""
        fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError("the spool is not open")
        return self._db

    def _require_normal(self) -> sqlite3.Connection:
        if self._db_normal is None:
            raise StorageError("the spool is not open")
        return self._db_normal

    # --- reading and acknowledging ---------------------------------------------------------
    def hot_batch(self, limit: int) -> list[SpoolEntry]:
        """The oldest `limit` committed rows of the hot kinds, from memory, in append order; []
        when there are none or the in-memory copy is incomplete (then read_batch has them)."""
        if not self._hot_complete or not self._hot:
            return []
        out: list[SpoolEntry] = []
        for seq, item in self._hot.items():
            if len(out) >= limit:
                break
            if isinstance(item, _Pending):
                item = self._hot[seq] = SpoolEntry(
                    seq=seq,
                    kind=item.kind,
                    thread_id=item.thread_id,
                    created=item.created,
                    size=len(item.blob),
                    blob=item.blob,
                )
            out.append(item)
        self.hot_taken_total += len(out)
        return out

    @property
    def hot_ready(self) -> bool:
        """Rows of the hot kinds wait in memory for the flusher."""
        return self._hot_complete and bool(self._hot)

    async def read_batch(self, limit: int) -> list[SpoolEntry]:
        """The oldest `limit` rows, in append order."""
        return await self._call(self._read_sync, limit)

    def _read_sync(self, limit: int) -> list[SpoolEntry]:
        cur = self._require_db().execute(
            "SELECT seq, kind, thread_id, created, payload FROM spool ORDER BY seq LIMIT ?", (limit,)
        )
        return [_entry(row) for row in cur]

    def has_pending(self, thread_id: str) -> bool:
        """Whether this spool holds unflushed rows of the thread (no disk access)."""
        return bool(self._threads.get(thread_id))

    async def pending_for_thread(self, thread_id: str) -> list[SpoolEntry]:
        """This process's unflushed rows of one thread (so reads see their own writes)."""
        if not self._threads.get(thread_id):
            return []
        return await self._call(self._thread_sync, thread_id)

    def _thread_sync(self, thread_id: str) -> list[SpoolEntry]:
        cur = self._require_db().execute(
            "SELECT seq, kind, thread_id, created, payload FROM spool WHERE thread_id = ? ORDER BY seq",
            (thread_id,),
        )
        return [_entry(row) for row in cur]

    async def find(self, kind: str, head: bytes) -> list[SpoolEntry]:
        """The unflushed rows of `kind` whose JSON begins with `head`, in append order (a scan of
        the file: for recovery at start, not for a hot path)."""
        return await self._call(self._find_sync, kind, head)

    def _find_sync(self, kind: str, head: bytes) -> list[SpoolEntry]:
        cur = self._require_db().execute(
            "SELECT seq, kind, thread_id, created, payload FROM spool"
            " WHERE kind = ? AND substr(payload, 1, ?) = ? ORDER BY seq",
            (kind, len(head), head),
        )
        return [_entry(row) for row in cur]

    async def ack(self, entries: list[SpoolEntry]) -> None:
        """Forget rows that Postgres now holds."""
        if not entries:
            return
        seqs = [e.seq for e in entries]
        oldest = await self._call(self._delete_sync, seqs, None)
        self._forget(entries, oldest)

    async def quarantine(self, entries: list[SpoolEntry], error: str) -> None:
        """Move rows Postgres rejects for good (bad data) aside, so they cannot block the spool.

        They stay in the `dead` table of the spool file for an operator to inspect; never dropped.
        """
        if not entries:
            return
        oldest = await self._call(self._delete_sync, [e.seq for e in entries], error)
        self.dead_rows += len(entries)
        self._forget(entries, oldest)

    def _delete_sync(self, seqs: list[int], dead_error: str | None) -> float | None:
        db = self._require_normal()  # synchronous=NORMAL: a lost delete only causes an idempotent replay
        db.execute("BEGIN IMMEDIATE")
        try:
            params = [(s,) for s in seqs]
            if dead_error is not None:
                db.executemany(
                    _DEAD_INSERT,
                    [(dead_error, time.time(), s) for s in seqs],
                )
            db.executemany("DELETE FROM spool WHERE seq = ?", params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        row = db.execute("SELECT created FROM spool ORDER BY seq LIMIT 1").fetchone()
        return float(row[0]) if row else None

    def _forget(self, entries: list[SpoolEntry], oldest: float | None) -> None:
        self.rows -= len(entries)
        self.bytes -= sum(e.size for e in entries)
        for e in entries:
            if e.kind in self.hot_kinds:
                self.hot_rows -= 1
                self._hot.pop(e.seq, None)
            if e.thread_id is not None:
                left = self._threads[e.thread_id] - 1
                if left > 0:
                    self._threads[e.thread_id] = left
                else:
                    self._threads.pop(e.thread_id, None)
        self.oldest = oldest if self.rows > 0 else None
        if not self._hot_complete and self.hot_rows <= 0:
            self.hot_rows = 0
            self._hot_complete = True  # every hot row left was flushed: memory is complete again
        self._space.set()
        if self._full_episode and self.bytes + self._reserved < self.max_bytes * 0.9:
            self._full_episode = False
            log.warning("spool has room again (%d/%d bytes); writes accepted", self.bytes, self.max_bytes)
        if self.rows == 0:
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def stats(self) -> dict[str, Any]:
        with self._fsync_cond:  # the fsync thread adds to it
            unsynced_window = self.unsynced_window.summary()
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "oldest_age_s": round(time.time() - self.oldest, 3) if self.oldest is not None else 0.0,
            "dead_rows": self.dead_rows,
            "refused_total": self.refused_total,
            "blocked_total": self.blocked_total,
            "commits_total": self.commits_total,
            "appends_total": self.appends_total,
            "hot_rows": self.hot_rows,
            "hot_taken_total": self.hot_taken_total,
            "unsynced_commits": self.unsynced_commits,
            "unsynced_window": unsynced_window,
            "max_bytes": self.max_bytes,
            "path": str(self.path),
        }


class _Worker:
    """The spool's thread: runs jobs one at a time, in the order they were given. A plain queue
    and a thread rather than a ThreadPoolExecutor: a commit's hand-off is one queue put, with no
    future, lock or semaphore per job on either side (the thread answers the loop itself)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the thread (its result is dropped; an exception is logged)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((fn, args))

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on the thread, its result (or exception) set on the returned future of the
        running loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self.submit(_answer, loop, fut, fn, args)
        return fut

    def shutdown(self) -> None:
        """Stop the thread once the jobs given so far have run (they have, after a `call`)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                log.exception("a spool job failed on the spool's thread")


def _answer(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """On the spool's thread: run `fn` and hand its outcome to `fut`, on its loop."""
    try:
        result = fn(*args)
    except BaseException as exc:
        outcome: tuple[Callable[..., None], Any] = (_fail, exc)
    else:
        outcome = (_resolve, result)
    try:
        loop.call_soon_threadsafe(outcome[0], fut, outcome[1])
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _entry(row: tuple[Any, ...]) -> SpoolEntry:
    seq, kind, thread_id, created, payload = row
    return SpoolEntry(
        seq=int(seq),
        kind=str(kind),
        thread_id=thread_id,
        created=float(created),
        size=len(payload),
        blob=payload if isinstance(payload, bytes) else str(payload).encode(),
    )


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a row's outcome as seen: its batch-mate's future reports the same one."""
    if not fut.cancelled():
        fut.exception()


def _nothing() -> None:
    """A job for the spool's thread that only marks a point in its queue."""
