"""Notification streams end at the router: GET streams and subscriptions/listen, resumable.

One fleet under real supervisord serves the module. Notifications are published the way
instances publish them (common/notifications.EventLog on the fleet's Redis) or through the
admin API; streams are read with a raw SSE reader where a test needs event ids and
Last-Event-ID, and with the SDK's own `Client` otherwise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp.client.subscriptions import ResourcesListChanged, ResourceUpdated, ToolsListChanged
from mcp.shared.exceptions import MCPError

from common.notifications import EventLog, notification, parse_id
from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, instance_num, mcp_client, status_of
from tests.router.sse import Reader

pytestmark = pytest.mark.timeout(180)

VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
UPDATED = "notifications/resources/updated"


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=2,
        max_instances=2,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        stream_keepalive=1.0,
        stream_retry_ms=4000,
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet) -> AsyncIterator[None]:
    yield
    await fleet.end_all_sessions()


@pytest.fixture
async def events(fleet: Fleet) -> AsyncIterator[EventLog]:
    """The instances' publishing path, from the test process (works while the router is down)."""
    client = aioredis.Redis.from_url(fleet.settings.redis_url or "", decode_responses=True)
    yield EventLog(client, fleet.keys, maxlen=fleet.settings.notify_log_maxlen, ttl=600)
    await client.aclose()


class Handshake:
    """A handshake-era session spoken by hand, so the test sees every header and event id."""

    def __init__(self, fleet: Fleet, http: aiohttp.ClientSession) -> None:
        self.fleet, self.http, self.sid = fleet, http, ""

    def headers(self, **extra: str) -> dict[str, str]:
        h = {"Accept": ACCEPT, "MCP-Protocol-Version": VERSION, **extra}
        if self.sid:
            h["Mcp-Session-Id"] = self.sid
        return h

    async def open(self, name: str) -> Handshake:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": name}},
        }
        async with self.http.post(self.fleet.mcp_url, json=init, headers=self.headers()) as r:
            assert r.status == 200, await r.text()
            self.sid = r.headers["Mcp-Session-Id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with self.http.post(self.fleet.mcp_url, json=note, headers=self.headers()) as r:
            assert r.status == 202, await r.text()
        return self

    async def status(self) -> dict[str, Any]:
        req = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "status", "arguments": {}},
        }
        async with self.http.post(self.fleet.mcp_url, json=req, headers=self.headers()) as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith("data:"):
                text = line[5:]
        return dict(json.loads(text)["result"]["structuredContent"])

    async def stream(self, last_event_id: str | None = None) -> aiohttp.ClientResponse:
        extra = {"Last-Event-ID": last_event_id} if last_event_id else {}
        return await self.http.get(
            self.fleet.mcp_url, headers=self.headers(Accept="text/event-stream", **extra)
        )


def _numbers(reader: Reader) -> list[int]:
    return [int(f.data["params"]["uri"].rsplit("/", 1)[1]) for f in reader.messages if f.data]


async def _publish(events: EventLog, sid: str, *numbers: int) -> None:
    for n in numbers:
        await events.append(sid, notification(UPDATED, {"uri": f"exai://test/{n}"}))


async def _notify(fleet: Fleet, sid: str, method: str, params: dict[str, Any] | None = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{fleet.router_url}/admin/sessions/{sid}/notify",
            json={"method": method, "params": params},
            headers=fleet.admin_headers(),
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def _wait_metric(fleet: Fleet, line_start: str, value: float, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while (seen := await _metric(fleet, line_start)) != value:  # noqa: ASYNC110 - polling a server
            await asyncio.sleep(0.1)
    assert seen == value


async def _metric(fleet: Fleet, line_start: str) -> float:
    _, text = await fleet.admin("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_get_stream_survives_instance_kill_and_router_restart(fleet: Fleet, events: EventLog) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        sess = await Handshake(fleet, http).open("survivor")
        before = await sess.status()
        first = Reader(await sess.stream()).start()
        assert first.resp.status == 200
        assert first.resp.headers["Content-Type"].startswith("text/event-stream")
        assert first.resp.headers["Mcp-Session-Id"] == sess.sid

        # Published through the admin API (the router writes it to the log, like an instance).
        body = await _notify(fleet, sess.sid, UPDATED, {"uri": "exai://test/1"})
        assert parse_id(body["id"]) is not None
        # What parking does to an instance (reset, session forgotten) does not touch the stream.
        base = f"http://127.0.0.1:{before['port']}"
        internal = {"X-Exai-Internal-Token": fleet.internal_token}
        async with http.get(base + "/internal/health", headers=internal) as r:
            fence = (await r.json())["fence"]
        # As the router resets it: in the bound session's name, with its lease's fencing token.
        fenced = {**internal, "X-Exai-Session": sess.sid, "X-Exai-Fence": fence}
        async with http.post(base + "/internal/reset", headers=fenced) as r:
            assert r.status == 200 and (await r.json())["session"] == ""
        await _publish(events, sess.sid, 2, 3)
        await first.wait_for(3)
        assert (await sess.status())["session"] == sess.sid  # rebuilt on the same instance

        # The session's instance dies: the stream is not its to lose.
        await asyncio.to_thread(fleet.kill_instance, instance_num(before["instance_id"]))
        await _publish(events, sess.sid, 4, 5)
        await first.wait_for(5)
        assert not first.done and first.retry == 4000
        await first.wait_keepalive()  # a quiet stream is kept alive with comments

        # The router restarts: the stream ends; events published meanwhile wait in the log.
        await asyncio.to_thread(fleet.supervisor.stop, "router", wait=True)
        await first.wait_for(99, timeout=20)
        assert first.done
        await _publish(events, sess.sid, 6, 7, 8)
        await asyncio.to_thread(fleet.supervisor.start, "router", wait=False)
        await asyncio.to_thread(fleet.wait_router_listening)

        last = first.messages[-1].id
        second = Reader(await sess.stream(last_event_id=last)).start()
        assert second.resp.status == 200, await second.resp.text()
        await second.wait_for(3)
        await _publish(events, sess.sid, 9, 10)
        await second.wait_for(5)

        got = _numbers(first) + _numbers(second)
        assert got == list(range(1, 11))
        ids = [f.id for f in first.messages + second.messages]
        parsed = [parse_id(i) for i in ids]
        assert None not in parsed and parsed == sorted(parsed) and len(set(ids)) == len(ids)

        # The session itself carries on (on another instance, its initialize replayed).
        after = await sess.status()
        assert after["session"] == sess.sid
        assert await _metric(fleet, 'exai_router_notify_catchups_total{kind="get"}') == 1
        assert await _metric(fleet, 'exai_router_notify_catchup_events_total{kind="get"}') == 3
        await first.stop()
        await second.stop()


async def _session_of(fleet: Fleet, client_name: str) -> dict[str, Any]:
    _, body = await fleet.admin("GET", "/admin/sessions")
    mine = [s for s in body["sessions"] if s["client"] == client_name]
    assert len(mine) == 1, body
    return dict(mine[0])


async def test_listen_with_the_sdk_client_costs_no_instance_and_resumes(
    fleet: Fleet, events: EventLog
) -> None:
    async with mcp_client(fleet.mcp_url, "2026-07-28", name="listener") as client:
        async with client.listen(resources_list_changed=True, resource_subscriptions=["exai://notes"]) as sub:
            assert sub.honored.resources_list_changed is True
            assert sub.honored.resource_subscriptions == ["exai://notes"]
            sess = await _session_of(fleet, "listener")
            assert sess["instance"] is None  # listening binds no instance

            received: list[Any] = []

            async def collect(n: int) -> None:
                async for event in sub:
                    received.append(event)
                    if len(received) == n:
                        return

            await _notify(fleet, sess["id"], "notifications/tools/list_changed")  # not asked for
            await _notify(fleet, sess["id"], "notifications/resources/list_changed")
            await _notify(fleet, sess["id"], UPDATED, {"uri": "exai://notes"})
            await _notify(fleet, sess["id"], UPDATED, {"uri": "exai://elsewhere"})  # not subscribed
            await asyncio.wait_for(collect(2), 20)
            assert received == [ResourcesListChanged(), ResourceUpdated(uri="exai://notes")]

            # A call from the same client lands in the listening session (and now binds one).
            status = await status_of(client)
            assert status["session"] == sess["id"]

            # The router restarts: the SDK resumes the listen stream by itself (GET with
            # Last-Event-ID); what was published while the router was down arrives, once.
            await asyncio.to_thread(fleet.supervisor.stop, "router", wait=True)
            await events.append(sess["id"], notification("notifications/resources/list_changed"))
            await asyncio.to_thread(fleet.supervisor.start, "router", wait=False)
            await asyncio.to_thread(fleet.wait_router_listening)
            await asyncio.wait_for(collect(3), 30)
            await events.append(sess["id"], notification(UPDATED, {"uri": "exai://notes"}))
            await asyncio.wait_for(collect(4), 20)
            assert received[2:] == [ResourcesListChanged(), ResourceUpdated(uri="exai://notes")]
            assert ToolsListChanged() not in received
            assert await _metric(fleet, 'exai_router_notify_catchups_total{kind="listen"}') == 1

            # Ending the session ends the subscription gracefully (the iteration just stops).
            status_code, _ = await fleet.admin("DELETE", f"/admin/sessions/{sess['id']}")
            assert status_code == 200
            rest = [e async for e in sub]
            assert rest == []


async def test_listen_wire_format_matches_the_sdk(fleet: Fleet) -> None:
    """The raw frames: ack first, subscription id in every _meta, ids for resuming."""
    headers = {"Accept": ACCEPT, "MCP-Protocol-Version": "2026-07-28", "Content-Type": "application/json"}
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw-listener", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    listen = {
        "jsonrpc": "2.0",
        "id": "sub-7",
        "method": "subscriptions/listen",
        "params": {
            "notifications": {"toolsListChanged": True, "promptsListChanged": False, "exaiEvents": True},
            "_meta": meta,
        },
    }
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        resp = await http.post(fleet.mcp_url, json=listen, headers=headers)
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        reader = Reader(resp).start()
        ack = (await reader.wait_for(1))[0]
        sub_meta = {"io.modelcontextprotocol/subscriptionId": "sub-7"}
        assert ack.data == {
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": sub_meta, "notifications": {"toolsListChanged": True, "exaiEvents": True}},
        }
        sess = await _session_of(fleet, "raw-listener")
        await _notify(fleet, sess["id"], "notifications/tools/list_changed")
        note = (await reader.wait_for(2))[1]
        assert note.data == {
            "jsonrpc": "2.0",
            "method": "notifications/tools/list_changed",
            "params": {"_meta": sub_meta},
        }
        assert ack.id and note.id and ack.id.rsplit(".", 1)[0] == note.id.rsplit(".", 1)[0]
        # Outside the change vocabulary (linked-session events next): only with exaiEvents.
        await _notify(fleet, sess["id"], "notifications/exai/linked", {"from": "peer", "text": "hi"})
        linked = (await reader.wait_for(3))[2]
        assert linked.data == {
            "jsonrpc": "2.0",
            "method": "notifications/exai/linked",
            "params": {"from": "peer", "text": "hi", "_meta": sub_meta},
        }

        # A plain GET in this era is refused (and binds nothing); a stale listen id is unknown.
        get_headers = {"Accept": "text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
        async with http.get(fleet.mcp_url, headers=get_headers) as r:
            assert r.status == 405
        async with http.get(fleet.mcp_url, headers={**get_headers, "Last-Event-ID": "nope.1-0"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["data"]["error"] == "session_not_found"
        assert (await _session_of(fleet, "raw-listener"))["instance"] is None

        await fleet.admin("DELETE", f"/admin/sessions/{sess['id']}")
        final = (await reader.wait_for(4))[3]
        assert final.data == {
            "jsonrpc": "2.0",
            "id": "sub-7",
            "result": {"_meta": sub_meta, "resultType": "complete"},
        }
        await reader.wait_for(5)
        assert reader.done
        await reader.stop()


async def test_streams_see_only_their_own_session_and_are_capped(fleet: Fleet) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        a = await Handshake(fleet, http).open("iso-a")
        b = await Handshake(fleet, http).open("iso-b")
        ra, rb = Reader(await a.stream()).start(), Reader(await b.stream()).start()
        for n in range(1, 7):
            await _notify(fleet, (a if n % 2 else b).sid, UPDATED, {"uri": f"exai://test/{n}"})
        await ra.wait_for(3)
        await rb.wait_for(3)
        assert _numbers(ra) == [1, 3, 5] and _numbers(rb) == [2, 4, 6]

        # EXAI_STREAMS_PER_SESSION (4): a fifth stream of one session is refused at once.
        extra = [Reader(await a.stream()).start() for _ in range(3)]
        refused = await a.stream()
        assert refused.status == 409
        assert (await refused.json())["error"]["data"]["error"] == "too_many_streams"
        assert await _metric(fleet, 'exai_router_notify_streams{kind="get"}') == 5

        # A client that goes away frees its stream (the handler is cancelled on disconnect).
        for r in extra:
            await r.stop()
        await _wait_metric(fleet, 'exai_router_notify_streams{kind="get"}', 2)
        late = Reader(await a.stream()).start()
        assert late.resp.status == 200
        await _notify(fleet, a.sid, UPDATED, {"uri": "exai://test/7"})
        await late.wait_for(1)
        await ra.wait_for(4)
        assert _numbers(late) == [7] and _numbers(ra) == [1, 3, 5, 7] and _numbers(rb) == [2, 4, 6]

        # DELETE ends the session and its streams.
        async with http.delete(fleet.mcp_url, headers=a.headers()) as r:
            assert r.status == 200
        await ra.wait_for(99)
        await late.wait_for(99)
        assert ra.done and late.done and not rb.done
        for r in (ra, rb, late):
            await r.stop()


NOTES_URI = "exai://session/notes"
TASKS_URI = "exai://session/tasks"


@pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed")
async def test_instances_announce_note_and_task_changes_to_both_eras(fleet: Fleet) -> None:
    """The real producers: note and task tools publish resources/updated for the session."""
    seen: list[Any] = []
    arrived = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            seen.append(message.params.uri)
            arrived.set()

    async def next_update() -> str:
        async with asyncio.timeout(20):
            while not seen:
                arrived.clear()
                await arrived.wait()
        return str(seen.pop(0))

    # Handshake era: the SDK client's own GET stream (held by the router) brings them.
    async with mcp_client(fleet.mcp_url, "legacy", name="producer-a", message_handler=on_message) as a:
        await _wait_metric(fleet, 'exai_router_notify_streams{kind="get"}', 1)
        # A handshake-era client may ask first: the server advertises and accepts subscriptions
        # to its own resources and refuses a URI it does not serve.
        resources = a.server_capabilities.resources
        assert resources is not None and resources.subscribe, a.server_capabilities
        await a.subscribe_resource(NOTES_URI)
        await a.subscribe_resource("exai://link/my-project/inbox")
        with pytest.raises(MCPError) as refused:
            await a.subscribe_resource("file:///etc/passwd")
        assert refused.value.code == -32602 and "resources/list" in refused.value.message
        write = await a.call_tool("note_write", {"key": "plan", "body": "ship it"})
        assert not write.is_error, write
        assert await next_update() == NOTES_URI
        created = await a.call_tool("task_create", {"name": "write the README"})
        assert not created.is_error, created
        assert await next_update() == TASKS_URI
        content = await a.read_resource(NOTES_URI)
        body = json.loads(content.contents[0].text)  # type: ignore[union-attr]
        assert [n["key"] for n in body["notes"]] == ["plan"]
        status = await status_of(a)
        assert body["session"] == status["session"]
        assert status["notifications"] == {"published": 2, "pending": 0, "dropped": 0}
        await a.unsubscribe_resource(NOTES_URI)

    # 2026-07-28: a listen stream that subscribed to the notes resource.
    async with (
        mcp_client(fleet.mcp_url, "2026-07-28", name="producer-b") as b,
        b.listen(resource_subscriptions=[NOTES_URI]) as sub,
    ):
        await b.call_tool("task_create", {"name": "not subscribed to tasks"})
        await b.call_tool("note_write", {"key": "k", "body": "v"})
        event = await asyncio.wait_for(anext(aiter(sub)), 20)
        assert event == ResourceUpdated(uri=NOTES_URI)


async def test_a_carried_event_that_skips_ahead_of_the_stream_is_read_from_the_log(
    fleet: Fleet, events: EventLog
) -> None:
    """Writers publish each event with the id before it, and a stream up to date writes it
    without reading the log; one that is not (an entry it never heard of, an older writer's
    bare id) reads the log, so nothing is skipped and nothing is written twice."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        sess = await Handshake(fleet, http).open("gaps")
        reader = Reader(await sess.stream()).start()
        assert reader.resp.status == 200
        await _publish(events, sess.sid, 1)  # carried, follows on from the stream's cursor
        await reader.wait_for(1)
        log_key = fleet.keys.events(sess.sid)
        # 2 is logged without a publish (as if its publish were lost); 3's publish then names 2
        # as the entry before it, which this stream never wrote.
        await events.redis.xadd(log_key, {"m": json.dumps(notification(UPDATED, {"uri": "exai://test/2"}))})
        await _publish(events, sess.sid, 3)
        await reader.wait_for(3)
        # An older writer's publish: the bare id.
        four = await events.redis.xadd(
            log_key, {"m": json.dumps(notification(UPDATED, {"uri": "exai://test/4"}))}
        )
        await events.redis.publish(fleet.keys.session_channel(sess.sid), four)
        await reader.wait_for(4)
        await events.append_many(
            [(sess.sid, notification(UPDATED, {"uri": f"exai://test/{n}"})) for n in (5, 6)]
        )
        await reader.wait_for(6)
        await asyncio.sleep(0.3)  # room for a duplicate to show up
        assert _numbers(reader) == [1, 2, 3, 4, 5, 6]
        ids = [f.id for f in reader.messages]
        parsed = [parse_id(i) for i in ids]
        assert None not in parsed and parsed == sorted(parsed) and len(set(ids)) == len(ids)
        await reader.stop()
