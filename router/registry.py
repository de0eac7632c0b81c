"""The instances that are alive, as their Redis heartbeats say.

An instance is alive while its registry hash exists (the heartbeat refreshes its TTL); the
router adds what only it sees: connection failures mark an instance process as suspect until
a new process (another pid) registers under the same id, or for SUSPECT_SECONDS at most.

Suspicion is short on purpose. A process that really died loses its registry entry within
EXAI_HEARTBEAT_TTL anyway, and trying it once more costs one refused connection. But a process
that supervisord has just restarted registers as ready a moment before its listener is open:
refused connections then mean "not yet", and suspecting that pid for good would leave the
instance unusable until its next restart (sessions waiting for it time out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from common.keys import Keys

SUSPECT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    host: str
    port: int
    pid: str
    state: str
    session: str
    started_at: float
    heartbeat: float
    fence: str = ""  # the fencing token of the session it serves ("" while unbound)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 pod address
        return f"http://{host}:{self.port}"

    @property
    def heartbeat_age(self) -> float:
        return max(0.0, time.time() - self.heartbeat) if self.heartbeat else float("inf")

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Instance | None:
        try:
            return cls(
                id=data["id"],
                host=data.get("host") or "127.0.0.1",
                port=int(data["port"]),
                pid=data.get("pid", ""),
                state=data.get("state", "ready"),
                session=data.get("session", ""),
                started_at=float(data.get("started_at") or 0),
                heartbeat=float(data.get("heartbeat") or 0),
                fence=data.get("fence", ""),
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Survey:
    """The registry at one look: live instances, the draining set, and each lease's holder."""

    instances: dict[str, Instance]
    draining: set[str]
    holders: dict[str, str | None]


class Registry:
    """Reads the instance registry; remembers instance processes that refused connections."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._suspect: dict[str, tuple[str, float]] = {}  # instance id -> (pid that failed, when)
        self.last: dict[str, Instance] = {}

    async def instances(self) -> dict[str, Instance]:
        """Every registered instance whose heartbeat key still exists; prunes the id set."""
        ids = sorted(str(i) for i in await self.redis.smembers(self.keys.instances()))
        if not ids:
            self.last = {}
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid in ids:
                pipe.hgetall(self.keys.instance(iid))
            rows = await pipe.execute()
        return await self._found(ids, rows)

    async def survey(self, lease_key: Callable[[str], str]) -> Survey:
        """`instances()`, `draining()` and who holds each instance's lease (`lease_key` names
        its key) in two round trips instead of four: the allocator's look at the whole fleet."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keys.instances())
            pipe.smembers(self.keys.draining())
            members, marked = await pipe.execute()
        ids = sorted(str(i) for i in members)
        draining = {str(i) for i in marked}
        if not ids:
            self.last = {}
            return Survey({}, draining, {})
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid in ids:
                pipe.hgetall(self.keys.instance(iid))
            pipe.mget([lease_key(iid) for iid in ids])
            *rows, values = await pipe.execute()
        found = await self._found(ids, rows)
        holders = {iid: (str(v) if v is not None else None) for iid, v in zip(ids, values, strict=True)}
        return Survey(found, draining, {iid: holders[iid] for iid in found})

    async def _found(self, ids: list[str], rows: list[Any]) -> dict[str, Instance]:
        found: dict[str, Instance] = {}
        gone: list[str] = []
        for iid, row in zip(ids, rows, strict=True):
            inst = Instance.from_hash(dict(row)) if row else None
            if inst is None:
                gone.append(iid)
                continue
            found[iid] = inst
            mark = self._suspect.get(iid)
            if mark is not None and mark[0] != inst.pid:
                del self._suspect[iid]  # a new process took over the id
        if gone:
            await self.redis.srem(self.keys.instances(), *gone)
        self.last = found
        return found

    async def get(self, instance_id: str) -> Instance | None:
        row: dict[str, str] = await self.redis.hgetall(self.keys.instance(instance_id))  # type: ignore[assignment]
        return Instance.from_hash(row) if row else None

    def mark_suspect(self, inst: Instance) -> None:
        self._suspect[inst.id] = (inst.pid, time.monotonic())

    def is_suspect(self, inst: Instance) -> bool:
        mark = self._suspect.get(inst.id)
        if mark is None:
            return False
        if mark[0] == inst.pid and time.monotonic() - mark[1] < SUSPECT_SECONDS:
            return True
        del self._suspect[inst.id]
        return False

    async def draining(self) -> set[str]:
        return {str(i) for i in await self.redis.smembers(self.keys.draining())}

    async def set_draining(self, instance_id: str) -> None:
        await self.redis.sadd(self.keys.draining(), instance_id)

    async def clear_draining(self, instance_id: str) -> bool:
        """Undo a drain; False if the instance was not draining."""
        return bool(await self.redis.srem(self.keys.draining(), instance_id))

    async def cap(self) -> int | None:
        """The operator's ceiling on running instances (`exai scale N`), if one is set."""
        value = await self.redis.get(self.keys.instance_cap())
        return int(value) if value is not None and str(value).isdigit() else None
