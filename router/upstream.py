"""The router's HTTP clients towards its instances: two bounded pools, stale connections dropped.

Two ClientSessions, each with its own connector, so that long-lived streams can never starve
calls:

- `calls`: POST and DELETE requests and the router's own control requests (health, reset,
  replayed initialize). At most CALLS_PER_INSTANCE connections per instance; an instance
  serves one session, so this only bounds what one client can have in flight at once.
- `streams`: handshake-era GET streams (server-to-client notifications), which stay open for
  as long as the client listens. At most STREAMS_PER_INSTANCE per instance, hence at most
  max_instances x STREAMS_PER_INSTANCE in all; the proxy refuses a session's extra stream
  with 409 before it could ever wait for a slot.

Both connectors check a pooled keep-alive connection before reusing it: when an instance
process dies (kill -9, OOM), the kernel closes its sockets at once, but the router's event
loop may not have read that EOF yet when the next request picks the idle connection. Writing
a request into such a connection fails in a way that looks exactly like "the instance died
while handling it" (ambiguous, so a tools/call could not be re-sent). A zero-timeout poll of
the socket sees the EOF that is already there; the connection is closed and the request goes
out on a fresh one (refused -> failover, or the restarted process -> session replay).
"""

from __future__ import annotations

import select
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.tracing import Trace

CALLS_PER_INSTANCE = 32
STREAMS_PER_INSTANCE = 2
KEEPALIVE_TIMEOUT = 30.0


def peer_closed(proto: ResponseHandler) -> bool:
    """True if an idle pooled connection must not be reused: the peer closed it (EOF or reset
    waiting in the socket) or sent something unasked."""
    transport = proto.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    # An idle HTTP/1.1 connection has nothing to read; readable means EOF, RST or garbage.
    return bool(poller.poll(0))


class CheckedConnector(aiohttp.TCPConnector):
    """A TCPConnector that never hands out a pooled connection its peer has already closed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stale_dropped = 0

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> aiohttp.connector.Connection | None:
        while True:
            conn = await super()._get(key, traces)
            if conn is None or conn.protocol is None or not peer_closed(conn.protocol):
                return conn
            self.stale_dropped += 1
            conn.close()  # closes the transport and frees the slot; try the next pooled one


@dataclass
class Upstream:
    calls: aiohttp.ClientSession
    streams: aiohttp.ClientSession

    @classmethod
    def create(cls, max_instances: int) -> Upstream:
        def session(per_host: int, total: int) -> aiohttp.ClientSession:
            connector = CheckedConnector(
                limit=total, limit_per_host=per_host, keepalive_timeout=KEEPALIVE_TIMEOUT, ttl_dns_cache=None
            )
            return aiohttp.ClientSession(
                connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(None)
            )

        return cls(
            calls=session(CALLS_PER_INSTANCE, CALLS_PER_INSTANCE * max_instances),
            streams=session(STREAMS_PER_INSTANCE, STREAMS_PER_INSTANCE * max_instances),
        )

    @property
    def stale_dropped(self) -> int:
        return sum(
            s.connector.stale_dropped
            for s in (self.calls, self.streams)
            if isinstance(s.connector, CheckedConnector)
        )

    async def close(self) -> None:
        await self.calls.close()
        await self.streams.close()
