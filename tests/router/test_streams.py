"""Long-lived GET streams: no read timeout, and they never take what calls need.

Handshake-era clients keep a GET stream open for server-to-client messages, silent for as long
as the server has nothing to say. The router holds those streams itself (router/streams.py), so
the upstream read timeout (EXAI_UPSTREAM_READ_TIMEOUT, 2 s here) that applies to POST answers
cannot cut them off, and they use no connection to an instance at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS

pytestmark = pytest.mark.timeout(120)

VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
READ_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=3,
        max_instances=3,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        provider_max_retries=0,
        upstream_read_timeout=READ_TIMEOUT,
        streams_per_session=1,
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet, provider: FakeProvider) -> AsyncIterator[None]:
    yield
    provider.reset()
    await fleet.end_all_sessions()


class RawSession:
    """A handshake-era session spoken by hand, so a test controls every stream it opens."""

    def __init__(self, fleet: Fleet, http: aiohttp.ClientSession, name: str) -> None:
        self.fleet = fleet
        self.http = http
        self.name = name
        self.sid = ""
        self.rid = 0

    def headers(self, accept: str = ACCEPT) -> dict[str, str]:
        h = {"Accept": accept, "MCP-Protocol-Version": VERSION}
        if self.sid:
            h["Mcp-Session-Id"] = self.sid
        return h

    async def open(self) -> RawSession:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": self.name}},
        }
        async with self.http.post(self.fleet.mcp_url, json=init, headers=self.headers()) as r:
            assert r.status == 200, await r.text()
            await r.read()
            self.sid = r.headers["Mcp-Session-Id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with self.http.post(self.fleet.mcp_url, json=note, headers=self.headers()) as r:
            assert r.status == 202, await r.text()
        return self

    async def call(self, tool: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """tools/call; returns the JSON-RPC response (from a JSON or an SSE answer)."""
        self.rid += 1
        rid = self.rid
        req = {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args or {}},
        }
        async with self.http.post(self.fleet.mcp_url, json=req, headers=self.headers()) as r:
            text = await r.text()
            if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                for line in text.splitlines():
                    if line.startswith("data:") and line[5:].strip():
                        msg = json.loads(line[5:])
                        if msg.get("id") == rid:
                            return dict(msg)
                raise AssertionError(f"no answer in the stream: {text!r}")
            return dict(json.loads(text))

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[aiohttp.ClientResponse]:
        """The session's GET stream (server-to-client messages), held open until exit."""
        async with self.http.get(self.fleet.mcp_url, headers=self.headers("text/event-stream")) as r:
            yield r


def _ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert "result" in answer, answer
    assert not answer["result"].get("isError"), answer
    return dict(answer["result"].get("structuredContent") or {})


async def test_a_silent_get_stream_outlives_the_upstream_read_timeout(
    fleet: Fleet, provider: FakeProvider
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as http:
        sess = await RawSession(fleet, http, "listener").open()
        async with sess.stream() as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            # Silent for 2.5 x the read timeout (aiohttp's own default would be 5 minutes, so
            # what matters is that the router sets no read timeout on GET streams at all).
            await asyncio.sleep(READ_TIMEOUT * 2.5)
            assert not stream.content.at_eof() and stream.connection is not None
            status = _ok(await sess.call("status"))  # the session works while its stream is open
            assert status["session"] == sess.sid
            _, metrics = await fleet.admin("GET", "/metrics")
            assert 'exai_router_notify_streams{kind="get"} 1' in metrics

            # A POST answer that stays silent longer than the read timeout is cut off with a
            # clear error (the provider takes 3 x the timeout to answer).
            provider.reset(Behaviour(delay=READ_TIMEOUT * 3))
            answer = await sess.call("chat", {"prompt": "slow"})
            assert answer["error"]["data"]["error"] == "instance_lost", answer
            provider.reset()

            # The stream lived through all of that, and ends when the session does.
            assert not stream.content.at_eof()
            async with http.delete(fleet.mcp_url, headers=sess.headers()) as r:
                assert r.status == 200
            rest = await asyncio.wait_for(stream.content.read(), 30)
            assert stream.content.at_eof(), rest


async def test_open_streams_never_starve_calls(fleet: Fleet) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        sessions = [await RawSession(fleet, http, f"streamer-{i}").open() for i in range(3)]
        streams = [await stack.enter_async_context(s.stream()) for s in sessions]
        assert [s.status for s in streams] == [200, 200, 200]

        # A session's extra stream is refused at once (EXAI_STREAMS_PER_SESSION=1), not queued.
        async with sessions[0].stream() as extra:
            assert extra.status == 409
        async with sessions[0].stream() as extra:
            assert extra.status == 409

        # With every session holding its stream open, many concurrent calls all get through.
        answers = await asyncio.gather(*(s.call("version") for s in sessions for _ in range(10)))
        assert all("result" in a and not a["result"].get("isError") for a in answers), answers
        statuses = [_ok(await s.call("status")) for s in sessions]
        assert [st["session"] for st in statuses] == [s.sid for s in sessions]
        assert len({st["instance_id"] for st in statuses}) == 3
        assert all(not s.content.at_eof() for s in streams)
        _, metrics = await fleet.admin("GET", "/metrics")
        assert 'exai_router_notify_streams{kind="get"} 3' in metrics
