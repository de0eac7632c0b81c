"""The thread cache lists this process keeps decoded, and when it may use them without asking Redis.

A read of a thread's cache passes the copy it holds (its Redis run and length) to the read
script, which then returns only the turns after it (docs/ARCHITECTURE.md, "Each read takes only
the new turns"); this process's own exchange extends the copy without being read back, when the
append's answer proves nobody pushed in between (`HeldCopies.hold_appended`).

With Redis-assisted client-side caching (instance/storage/tracking.py), a copy confirmed on the
tracking connection is used with no round trip at all while nothing invalidated the thread's
keys since (`HeldCopies.trusted`): it is confirmed by the stamped reply of the read that gave
it, by the stamped reply of this process's own append sent on the tracking connection, or by a
read sent there after an append that went on the direct line (`HeldCopies.confirm`). An append
of the thread starting (`HeldCopies.appending`) takes the copy's trust away until it holds the
exchange.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from common.keys import Keys
from instance.storage.models import Message
from instance.storage.thread_scripts import READ_LUA
from instance.storage.tracking import Stamp, Tracker

HELD_THREADS = 64
"""Threads whose cached turns this process keeps decoded (one session per instance: a few)."""
HELD_CHARS = 1_000_000
"""A thread with more content than this is decoded on every read instead of kept."""


@dataclasses.dataclass(frozen=True)
class Held:
    """The Redis list of a thread as this process last read it, decoded (and extended with the
    turns it appended right after, `HeldCopies.hold_appended`): the next read asks Redis only
    for the turns after it (see thread_scripts.READ_LUA)."""

    run: str  # the Redis run_id it was read on
    messages: tuple[Message, ...]  # the whole list, in list order
    # When it was last confirmed against Redis (tracking.Stamp): while nothing has invalidated the
    # thread's keys since, it is used without asking Redis (`HeldCopies.trusted`). None: ask Redis.
    stamp: Stamp | None = None
    checked: bool = False  # the cache was stamped with `run` (no Postgres check needed on it)


class HeldCopies:
    """The decoded cache lists of the threads read last (least recent first), and their trust.

    `unanswered(cid)`: whether an exchange of the thread this process sent still waits for its
    position (instance/storage/positions.py): sent on the tracking connection, its change would
    not be reported there, so no copy of the thread is trusted meanwhile.
    """

    def __init__(self, keys: Keys, tracker: Tracker | None, *, unanswered: Callable[[str], bool]) -> None:
        self._keys = keys
        self._tracker = tracker  # Redis-assisted client-side caching (tracking.py)
        self._unanswered = unanswered
        self.copies: OrderedDict[str, Held] = OrderedDict()
        # Held copies confirmed after an append: by the append's own reply on the tracking
        # connection, or by a read sent there after it (the append went on the direct line).
        self.confirms_total = 0
        # Appends this process started, counted; per thread, the count when its latest began: a
        # read sent before that append cannot be trusted to hold it (see `hold`).
        self._append_seq = 0
        self._appended_at: dict[str, int] = {}

    def get(self, cid: str) -> Held | None:
        return self.copies.get(cid)

    def drop(self, cid: str) -> None:
        self.copies.pop(cid, None)

    @property
    def writes(self) -> int:
        """The count of appends started so far: pass it to `appended_since` after a read."""
        return self._append_seq

    def appended_since(self, cid: str, writes: int) -> bool:
        """Whether an append of `cid` began after `writes` was taken (a reply may lack it)."""
        return self._appended_at.get(cid, 0) > writes

    def hold(
        self,
        cid: str,
        run: str,
        messages: list[Message],
        *,
        whole: bool,
        stamp: Stamp | None = None,
        checked: bool = False,
    ) -> None:
        """Keep a thread's decoded cache list for its next read; only an untrimmed list (`whole`:
        as many items as turns ever pushed) can be continued by index, and only a small one is kept."""
        if not whole or sum(len(m.content) for m in messages) > HELD_CHARS:
            self.copies.pop(cid, None)
            return
        self.copies[cid] = Held(run, tuple(messages), stamp, checked)
        self.copies.move_to_end(cid)
        while len(self.copies) > HELD_THREADS:
            self.copies.popitem(last=False)

    def hold_appended(
        self, cid: str, messages: list[Message], listed: int, stamp: Stamp | None = None
    ) -> None:
        """After an append that extended the thread's cache: if the list is now exactly what this
        process holds of it plus these turns (`listed`: its length, whole; nobody pushed in
        between), hold them too, so the next read gets nothing from Redis it has and decodes
        nothing. The held copy keeps the Redis run it was read on: a restart since then makes
        the next read start over (READ_LUA), whatever the list's length.

        `stamp`: the append went on the tracking connection, and this is its reply's stamp. The
        copy is then trusted from that stamp on, with no read to confirm it: the reply says the
        list is the copy (`listed`), NOLOOP kept the append's own invalidation away (a Redis that
        sends it anyway writes it before the reply: processed before the stamp, it is covered),
        and the script read both keys last, so a later change by anyone else is reported after
        the reply. Not while another exchange of the thread this process sent is unanswered: on
        this connection its change would not be reported."""
        # Once more now that Redis has the exchange: a read sent before its reply (on another
        # connection, so perhaps answered before the append) must not give a copy trust.
        self.appending(cid)
        held = self.copies.get(cid)
        if held is not None and listed == len(held.messages) + len(messages):
            self.hold(cid, held.run, [*held.messages, *messages], whole=True, checked=held.checked)
            if stamp is None:
                self.confirm(cid)
            elif held.checked and not self._unanswered(cid) and self._tracker is not None:
                kept = self.copies.get(cid)
                if kept is not None:
                    self.copies[cid] = dataclasses.replace(kept, stamp=stamp)
                    self.confirms_total += 1
        elif held is not None:
            # Somebody else pushed in between (or the list is gone or trimmed): the copy is not
            # the list plus this exchange, so it must not be trusted (the next read asks Redis).
            self.copies[cid] = dataclasses.replace(held, stamp=None)

    def appending(self, cid: str) -> None:
        """An append of `cid` starts: the held copy loses its trust until it holds the exchange
        (`hold_appended`), and no read already on its way may give it trust (`hold`)."""
        self._append_seq += 1
        if len(self._appended_at) > 50_000:
            self._appended_at.clear()
            self.copies.clear()  # copies read before a forgotten append must not be trusted
        self._appended_at[cid] = self._append_seq
        held = self.copies.get(cid)
        if held is not None and held.stamp is not None:
            self.copies[cid] = dataclasses.replace(held, stamp=None)

    def confirm(self, cid: str) -> None:
        """After this process's own append extended the held copy: confirm it on the tracking
        connection, so the next read trusts it without a round trip.

        The append changed the thread's keys, so its own invalidation is on its way; a read sent
        on the tracking connection after the append's reply is answered after that invalidation
        (Redis wrote it before processing the read), and the stamp taken with the reply covers it.
        The read is the ordinary tail read: it confirms only if the list is still exactly the
        held copy (same run, same length, stamped); anything else leaves the copy untrusted."""
        tracker, held = self._tracker, self.copies.get(cid)
        if tracker is None or held is None or not held.checked:
            return
        writes = self._append_seq
        keys = (self._keys.thread_meta(cid), self._keys.thread(cid))
        sent = tracker.send("EVAL", READ_LUA, 2, *keys, held.run, len(held.messages))
        if sent is not None:
            sent.add_done_callback(lambda fut: self._confirmed(cid, held, writes, fut))

    def _confirmed(self, cid: str, held: Held, writes: int, fut: asyncio.Future[tuple[Any, Stamp]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        answer, stamp = fut.result()
        try:
            flat, items, run, start = answer
            meta = dict(zip(flat[::2], flat[1::2], strict=True))
            same = (
                not items
                and int(start) == len(held.messages)
                and run == held.run
                and meta.get("run") == run
                and int(meta.get("turns", -1)) == len(held.messages)
            )
        except (ValueError, TypeError):
            return
        if (
            same
            and self.copies.get(cid) is held
            and self._appended_at.get(cid, 0) <= writes
            and not self._unanswered(cid)  # one on the tracking connection would not be reported
        ):
            self.copies[cid] = dataclasses.replace(held, stamp=stamp)
            self.confirms_total += 1

    def trusted(self, cid: str, held: Held) -> bool:
        """Whether the held copy is still the thread's cache list, without asking Redis."""
        tracker = self._tracker
        return (
            tracker is not None
            and held.stamp is not None
            and held.checked
            and tracker.unchanged(held.stamp, self._keys.thread_meta(cid), self._keys.thread(cid))
        )
