"""Linked sessions as an outside tester meets them: bad input, strangers, resources, presence,
the admin API and `exai links`, through the router with real clients of both eras.

tests/router/test_links.py holds the issue's main scenarios; this module holds the edges a
black-box client hits first: each refusal must say in words what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp.shared.exceptions import MCPError

from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, call, error_of, instance_num, mcp_client, status_of
from tests.router.sse import Reader

pytestmark = pytest.mark.timeout(240)

ALICE, BOB = "tok-alice", "tok-bob"


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=3,
        max_instances=3,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        auth_tokens=[f"alice={ALICE}", f"bob={BOB}"],
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet) -> AsyncIterator[None]:
    yield
    await fleet.end_all_sessions()


def _group() -> str:
    return f"acc-{secrets.token_hex(3)}"


async def _admin(fleet: Fleet, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Any:
    """(status, JSON body) of an admin request with a body (Fleet.admin sends none)."""
    headers = fleet.admin_headers()
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with http.request(method, fleet.router_url + path, headers=headers, **kwargs) as r:
            return r.status, await r.json(content_type=None)


def _exai(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("exai")), *args],
        env=fleet.environment(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_bad_input_and_strangers_are_refused_in_words(fleet: Fleet) -> None:
    group = _group()
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="acc-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "2026-07-28", name="acc-b", token=ALICE) as b,
        mcp_client(
            fleet.mcp_url, "legacy", name="acc-bob", token=BOB, headers={"Exai-Link-Group": group}
        ) as bob,
        mcp_client(fleet.mcp_url, "legacy", name="acc-admin", token=fleet.admin_token) as root,
    ):
        # Group names: refused before anything is created, saying what a name may hold.
        for bad in ("has space", "../etc", "-x", "é"):
            assert "group must be" in await error_of(a, "link_join", {"group": bad}), bad
        assert await error_of(a, "link_join", {"group": "x" * 101})  # over the length limit
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        b_sid = (await status_of(b))["session"]

        # Message bodies: the limit counts bytes, not characters; empty bodies are refused.
        at_limit = "a" * 16384
        await call(a, "link_send", {"group": group, "body": at_limit})
        over = await error_of(a, "link_send", {"group": group, "body": "é" * 8193})  # 16386 bytes
        assert "message_too_large" in over and "16386 bytes" in over and "16384" in over
        assert await error_of(a, "link_send", {"group": group, "body": ""})
        assert "message_too_large" in await error_of(
            a, "link_leave", {"group": group, "handoff": "b" * 16385}
        )  # refused: A is still in
        assert (await call(a, "link_status", {"group": group}))["group"] == group

        # Reservations: a ttl must be positive and within the limit; paths are required.
        for ttl in (0, -5):
            assert "ttl" in await error_of(a, "link_reserve", {"group": group, "paths": ["x"], "ttl": ttl})
        too_long = await error_of(a, "link_reserve", {"group": group, "paths": ["x"], "ttl": 86401})
        assert "invalid_argument" in too_long and "86400" in too_long
        assert await error_of(a, "link_reserve", {"group": group, "paths": []})
        # An odd glob is taken as written, and still conflicts with what it overlaps.
        await call(a, "link_reserve", {"group": group, "paths": ["src/[ab/**"], "ttl": 600})
        assert "reservation_conflict" in await error_of(
            b, "link_reserve", {"group": group, "paths": ["src/[ab/x.py"]}
        )
        # Releasing someone else's reservation releases nothing: it is still A's.
        assert (await call(b, "link_release", {"group": group, "paths": ["src/[ab/**"]}))["released"] == []
        assert (await call(b, "link_release", {"group": group}))["released"] == []
        assert "reservation_conflict" in await error_of(
            b, "link_reserve", {"group": group, "paths": ["src/[ab/x.py"]}
        )
        # An empty list is not "all of them".
        assert "paths" in await error_of(a, "link_release", {"group": group, "paths": []})
        assert [r["pattern"] for r in (await call(a, "link_status", {"group": group}))["reservations"]] == [
            "src/[ab/**"
        ]

        # Inbox paging arguments are checked.
        assert await error_of(b, "link_inbox", {"group": group, "limit": 0})

        # Strangers: bob (another principal) is not linked by his header and cannot join; a
        # member cannot message him either; group tasks and notes refuse him too.
        assert (await call(bob, "link_status"))["groups"] == []
        assert "link_forbidden" in await error_of(bob, "link_join", {"group": group})
        bob_sid = (await status_of(bob))["session"]
        assert "not_linked" in await error_of(a, "link_send", {"group": group, "body": "hi", "to": bob_sid})
        a_sid = (await status_of(a))["session"]
        to_self = await error_of(a, "link_send", {"group": group, "body": "memo", "to": a_sid})
        assert "invalid_argument" in to_self and "yourself" in to_self
        for tool, args in (
            ("link_status", {"group": group}),
            ("link_handoff", {"group": group, "note": "x"}),
            ("link_reserve", {"group": group, "paths": ["y"]}),
            ("task_create", {"name": "t", "scope": "group", "group": group}),
            ("task_list", {"scope": "group", "group": group}),
            ("note_write", {"key": "k", "body": "v", "scope": "group", "group": group}),
            ("note_list", {"scope": "group", "group": group}),
        ):
            assert "not_linked" in await error_of(bob, tool, args), tool
        assert "group" in await error_of(a, "task_create", {"name": "t", "scope": "group"})
        # A group task is not reachable by id from outside the group.
        task = (await call(a, "task_create", {"name": "shared", "scope": "group", "group": group}))["task"]
        assert await error_of(bob, "task_get", {"task_id": task["id"]})
        assert await error_of(bob, "task_update", {"task_id": task["id"], "expected_version": 1, "name": "x"})
        # A member who forgets `group` is told how to reach the group's task.
        forgot = await error_of(a, "task_update", {"task_id": task["id"], "expected_version": 1, "name": "x"})
        assert "task_not_found" in forgot and "group=" in forgot
        # Optimistic locking of group notes: a stale version is refused.
        await call(a, "note_write", {"key": "plan", "body": "v1", "scope": "group", "group": group})
        await call(b, "note_write", {"key": "plan", "body": "v2", "scope": "group", "group": group})
        stale = {"key": "plan", "body": "v3", "scope": "group", "group": group, "expected_version": 1}
        assert "version_conflict" in await error_of(a, "note_write", stale)
        assert (await call(a, "note_read", {"key": "plan", "scope": "group", "group": group}))["note"][
            "body"
        ] == "v2"

        # The admin principal's own session may join any principal's group.
        assert (await call(root, "link_join", {"group": group}))["joined"] is True
        # A member who left is a stranger again.
        await call(b, "link_leave", {"group": group})
        assert "not_linked" in await error_of(b, "link_inbox", {"group": group})
        members = (await call(a, "link_status", {"group": group}))["members"]
        assert b_sid not in [m["session"] for m in members]


async def test_resources_are_listed_subscribable_and_private(fleet: Fleet) -> None:
    group = _group()
    inbox, status_uri = f"exai://link/{group}/inbox", f"exai://link/{group}/status"
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="res-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "2026-07-28", name="res-b", token=ALICE) as b,
        mcp_client(fleet.mcp_url, "legacy", name="res-c", token=ALICE) as c,
    ):
        for client in (a, b):
            listed = (await client.list_resource_templates()).resource_templates
            templates = {str(t.uri_template) for t in listed}
            assert {"exai://link/{group}/inbox", "exai://link/{group}/status"} <= templates
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        await call(a, "link_inbox", {"group": group})  # B's join: read
        # resources/list names the inbox and status of the groups the session is in, no others.
        for client in (a, b):
            uris = {str(r.uri) for r in (await client.list_resources()).resources}
            assert {inbox, status_uri, "exai://session/notes"} <= uris
        assert not {str(r.uri) for r in (await c.list_resources()).resources} & {inbox, status_uri}
        # Connect-time linking by header works in the 2026-07-28 era too.
        async with mcp_client(
            fleet.mcp_url, "2026-07-28", name="res-hdr", token=ALICE, headers={"Exai-Link-Group": group}
        ) as d:
            assert (await call(d, "link_status"))["groups"] == [group]
            await call(d, "link_leave", {"group": group})  # (a 2026-07-28 session ends by expiry)
        await call(a, "link_inbox", {"group": group})  # D's join and leave: read
        # Handshake era: subscribing to the inbox is accepted, an unknown URI is refused in words.
        await a.subscribe_resource(inbox)
        with pytest.raises(Exception, match="resource_not_found"):
            await a.subscribe_resource("exai://link/has space/inbox")
        await call(b, "link_send", {"group": group, "body": "for the resource"})
        async with asyncio.timeout(20):
            while True:
                read = json.loads((await a.read_resource(inbox)).contents[0].text)  # type: ignore[union-attr]
                if read["events"]:
                    break
                await asyncio.sleep(0.05)
        assert [e["body"] for e in read["events"]] == ["for the resource"]
        # Reading the resource does not acknowledge; link_inbox does.
        assert [e["body"] for e in (await call(a, "link_inbox", {"group": group}))["events"]] == [
            "for the resource"
        ]
        assert json.loads((await a.read_resource(inbox)).contents[0].text)["events"] == []  # type: ignore[union-attr]
        status = json.loads((await b.read_resource(status_uri)).contents[0].text)  # type: ignore[union-attr]
        assert {m["client"] for m in status["members"]} == {"res-a", "res-b"}
        # An outsider of the same principal reads neither resource.
        for uri in (inbox, status_uri):
            with pytest.raises(Exception, match=r"\[not_linked\] this session is not a member"):
                await c.read_resource(uri)


async def test_presence_shows_clients_work_and_parking_and_a_parked_member_is_told(fleet: Fleet) -> None:
    group = _group()
    inbox = f"exai://link/{group}/inbox"
    b_updates: list[str] = []

    async def on_b(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            b_updates.append(str(message.params.uri))

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="pres-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="pres-b", token=ALICE, message_handler=on_b) as b,
    ):
        a_sid, b_sid = (await status_of(a))["session"], (await status_of(b))["session"]
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        own = (await call(a, "task_create", {"name": "own work", "state": "IN_PROGRESS"}))["task"]
        shared = (await call(a, "task_create", {"name": "shared work", "scope": "group", "group": group}))[
            "task"
        ]
        await call(
            a,
            "task_update",
            {"task_id": shared["id"], "expected_version": 1, "state": "IN_PROGRESS", "group": group},
        )
        async with asyncio.timeout(20):  # group task events are stored a moment after the call
            while not any(  # noqa: ASYNC110 - polling the store
                e["kind"] == "task" and e["data"]["state"] == "IN_PROGRESS"
                for e in (await call(b, "link_inbox", {"group": group}))["events"]
            ):
                await asyncio.sleep(0.05)

        # B parks (no instance); A sees it parked, and B still hears of A's message.
        code, parked = await _admin(fleet, "POST", f"/admin/sessions/{b_sid}/park")
        assert code == 200, parked
        status = await call(a, "link_status", {"group": group})
        by_sid = {m["session"]: m for m in status["members"]}
        assert (by_sid[a_sid]["client"], by_sid[b_sid]["client"]) == ("pres-a", "pres-b")
        assert (by_sid[a_sid]["state"], by_sid[b_sid]["state"]) == ("active", "parked")
        assert all(m["last_seen"] for m in status["members"])
        assert by_sid[a_sid]["you"] is True and by_sid[b_sid]["you"] is False
        # What A works on: its own task in progress, and the group task it moved to IN_PROGRESS.
        assert set(by_sid[a_sid]["working_on"]) == {own["name"], shared["name"]}
        assert by_sid[b_sid]["working_on"] == []
        seen = len(b_updates)
        await call(a, "link_send", {"group": group, "body": "while you were parked"})
        async with asyncio.timeout(20):
            while len(b_updates) == seen:  # noqa: ASYNC110 - waiting for a server push
                await asyncio.sleep(0.05)
        assert b_updates[-1] == inbox
        box = await call(b, "link_inbox", {"group": group})
        assert [e["body"] for e in box["events"]] == ["while you were parked"]

        # Last seen follows any call of the member, not only its link tools.

        async def b_seen() -> datetime:
            members = (await call(a, "link_status", {"group": group}))["members"]
            return datetime.fromisoformat(next(m["last_seen"] for m in members if m["session"] == b_sid))

        started = datetime.now(UTC)  # after every link call of B
        await call(b, "task_list", {})
        async with asyncio.timeout(20):  # the call's record is stored a moment after it answered
            while await b_seen() < started:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_admin_api_and_exai_links_say_what_happened(fleet: Fleet) -> None:
    group = _group()
    code, doc = await fleet.admin("GET", "/admin/openapi.json")
    assert code == 200
    paths = doc["paths"]
    assert set(paths["/admin/links"]) >= {"get"}
    assert set(paths["/admin/links/{group}"]) >= {"get", "delete"}
    assert set(paths["/admin/links/{group}/members"]) >= {"post"}
    assert set(paths["/admin/links/{group}/members/{session}"]) >= {"delete"}

    def documented(template: str, method: str, code: int, body: Any) -> None:
        """Every answer's status is in the OpenAPI document, and its body fits the schema."""
        responses = paths[template][method.lower()]["responses"]
        assert str(code) in responses, (template, method, code)
        schema = responses[str(code)]["content"]["application/json"]["schema"]
        jsonschema.validate(body, schema)

    # Without the admin token: refused.
    code, body = await fleet.admin("GET", "/admin/links", token=ALICE)
    assert code in (401, 403)
    documented("/admin/links", "GET", code, body)
    # Bad input: a body that is not {"session": ...}, an unknown session, a bad or unknown group.
    for raw in (b"", b"not json", b"[]", b'{"session": 5}', b"{}"):
        code, body = await _admin(fleet, "POST", f"/admin/links/{group}/members", raw=raw)
        assert (code, body["error"]) == (400, "invalid_argument"), (raw, body)
        documented("/admin/links/{group}/members", "POST", code, body)
    code, body = await _admin(fleet, "POST", f"/admin/links/{group}/members", {"session": "nope"})
    assert (code, body["error"]) == (404, "not_found") and "nope" in body["message"]
    documented("/admin/links/{group}/members", "POST", code, body)
    for method in ("GET", "DELETE"):
        code, body = await fleet.admin(method, "/admin/links/bad%20name")
        assert code == 400 and "group must be" in body["message"]
        documented("/admin/links/{group}", method, code, body)
        code, body = await fleet.admin(method, f"/admin/links/{group}")
        assert code == 404 and group in body["message"]
        documented("/admin/links/{group}", method, code, body)
    code, body = await fleet.admin("DELETE", "/admin/links/bad%20name/members/x")
    assert code == 400
    documented("/admin/links/{group}/members/{session}", "DELETE", code, body)

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="adm-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="adm-bob", token=BOB) as bob,
    ):
        await call(a, "link_join", {"group": group})
        bob_sid = (await status_of(bob))["session"]
        code, body = await _admin(fleet, "POST", f"/admin/links/{group}/members", {"session": bob_sid})
        assert (code, body["joined"]) == (200, True)
        code, body = await _admin(fleet, "POST", f"/admin/links/{group}/members", {"session": bob_sid})
        assert (code, body["joined"]) == (200, False)  # idempotent
        documented("/admin/links/{group}/members", "POST", code, body)
        await call(a, "link_reserve", {"group": group, "paths": ["src/**"], "ttl": 600})
        code, one = await fleet.admin("GET", f"/admin/links/{group}")
        assert code == 200 and {m["client"] for m in one["members"]} == {"adm-a", "adm-bob"}
        documented("/admin/links/{group}", "GET", code, one)
        assert [r["pattern"] for r in one["reservations"]] == ["src/**"]
        code, every = await fleet.admin("GET", "/admin/links")
        documented("/admin/links", "GET", code, every)
        assert all({"cursor", "behind", "principal"} <= set(m) for m in one["members"])
        assert {m["principal"] for m in one["members"]} == {"alice", "bob"}

        listed = await asyncio.to_thread(_exai, fleet, "links", "--json")
        assert listed.returncode == 0, listed.stderr
        (mine,) = [g for g in json.loads(listed.stdout) if g["group"] == group]
        assert len(mine["members"]) == 2
        # A refusal is told as the router worded it, not as "is the fleet up?".
        missing = await asyncio.to_thread(_exai, fleet, "links", "remove", group, "no-such-session")
        assert missing.returncode != 0
        assert "not in link group" in missing.stderr + missing.stdout, missing
        assert "Is the fleet up" not in missing.stderr + missing.stdout
        usage = await asyncio.to_thread(_exai, fleet, "links", "add", group)
        assert usage.returncode != 0 and "needs GROUP SESSION" in usage.stderr + usage.stdout

        removed = await asyncio.to_thread(_exai, fleet, "links", "remove", group, bob_sid)
        assert removed.returncode == 0, removed.stderr
        assert "not_linked" in await error_of(bob, "link_inbox", {"group": group})
        events = (await call(a, "link_inbox", {"group": group}))["events"]
        assert [(e["kind"], e["from"]) for e in events][-2:] == [("join", bob_sid), ("leave", bob_sid)]
        assert events[-1]["body"] == "removed by the admin"

        # /metrics: the link counts are counters, the lags summaries (sum and count).
        await call(a, "link_inbox", {"group": group})  # a read: a delivery lag observed
        _, text = await fleet.admin("GET", "/metrics")
        for name in ("events", "notifications", "catchups", "catchup_events"):
            assert f"# TYPE exai_links_{name}_total counter" in text
        for lag in ("delivery", "publish"):
            assert f"# TYPE exai_links_{lag}_lag_seconds summary" in text
        counts = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith("exai_links_delivery_lag_seconds_")
        }
        assert counts["exai_links_delivery_lag_seconds_count"] >= 1
        assert counts["exai_links_delivery_lag_seconds_sum"] >= 0

        # Deleting the group takes its log with it: Postgres rows and the Redis stream's tail.
        await call(a, "link_send", {"group": group, "body": "last words"})
        redis = aioredis.Redis.from_url(fleet.settings.redis_url or "")
        try:
            async with asyncio.timeout(20):
                while not await redis.exists(fleet.keys.link_stream(group)):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            deleted = await asyncio.to_thread(_exai, fleet, "links", "delete", group)
            assert deleted.returncode == 0, deleted.stderr
            assert not await redis.exists(fleet.keys.link_stream(group))
        finally:
            await redis.aclose()
        assert (await call(a, "link_status"))["groups"] == []
        code, _ = await fleet.admin("GET", f"/admin/links/{group}")
        assert code == 404


async def test_reservations_expire_by_themselves(fleet: Fleet) -> None:
    group = _group()
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="exp-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="exp-b", token=ALICE) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        held = await call(a, "link_reserve", {"group": group, "paths": ["lib/**"], "ttl": 1.5})
        assert held["reserved"][0]["pattern"] == "lib/**"
        refused = await error_of(b, "link_reserve", {"group": group, "paths": ["lib/a.py"]})
        assert held["reserved"][0]["expires_at"] in refused  # the expiry named is the real one
        # Shared (non-exclusive) reservations do not conflict with each other.
        await call(a, "link_reserve", {"group": group, "paths": ["docs/**"], "exclusive": False})
        await call(b, "link_reserve", {"group": group, "paths": ["docs/a.md"], "exclusive": False})
        async with asyncio.timeout(20):  # nobody releases lib/**: it lapses
            while any(  # noqa: ASYNC110 - polling the store
                r["pattern"] == "lib/**"
                for r in (await call(b, "link_status", {"group": group}))["reservations"]
            ):
                await asyncio.sleep(0.2)
        await call(b, "link_reserve", {"group": group, "paths": ["lib/a.py"]})


# --- the wire, without a client library ------------------------------------------------------
ACCEPT = "application/json, text/event-stream"
HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"


def _answer(text: str) -> dict[str, Any]:
    """A POST's JSON-RPC answer, sent as JSON or as one SSE frame."""
    for line in text.splitlines():
        if line.startswith("data:"):
            text = line[5:]
    return dict(json.loads(text))


class _Raw:
    """One session spoken by hand: the handshake era (Mcp-Session-Id) or 2026-07-28 (_meta)."""

    def __init__(self, fleet: Fleet, http: aiohttp.ClientSession, era: str, name: str, token: str) -> None:
        self.fleet, self.http, self.era, self.name = fleet, http, era, name
        self.base = {"Accept": ACCEPT, "MCP-Protocol-Version": era, "Authorization": f"Bearer {token}"}
        self.sid = ""
        self.rid = 0

    def _meta(self) -> dict[str, Any]:
        if self.era == HANDSHAKE:
            return {}
        return {
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientInfo": {"name": self.name, "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            }
        }

    @property
    def headers(self) -> dict[str, str]:
        return {**self.base, **({"Mcp-Session-Id": self.sid} if self.sid else {})}

    async def open(self) -> _Raw:
        if self.era == HANDSHAKE:
            init = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": self.name}}
            async with self.http.post(
                self.fleet.mcp_url,
                json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init},
                headers=self.headers,
            ) as r:
                assert r.status == 200, await r.text()
                self.sid = r.headers["Mcp-Session-Id"]
            note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            async with self.http.post(self.fleet.mcp_url, json=note, headers=self.headers) as r:
                assert r.status == 202, await r.text()
        return self

    async def rpc(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.rid += 1
        body = {"jsonrpc": "2.0", "id": self.rid, "method": method, "params": {**params, **self._meta()}}
        headers = self.headers
        if self.era == MODERN:  # the method (and the tool or resource) mirrored in headers
            headers["Mcp-Method"] = method
            if (named := params.get("name") or params.get("uri")) is not None:
                headers["Mcp-Name"] = named
        async with self.http.post(self.fleet.mcp_url, json=body, headers=headers) as r:
            return _answer(await r.text())

    async def tool(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """A tool's result: structuredContent on success; the answer's result when isError."""
        answer = await self.rpc("tools/call", {"name": name, "arguments": args})
        assert "result" in answer, answer
        result = answer["result"]
        return dict(result if result.get("isError") else result["structuredContent"])

    async def listen(self, uris: list[str]) -> Reader:
        """The session's notification stream: its GET stream (handshake era) or a
        subscriptions/listen stream subscribed to `uris` (2026-07-28)."""
        if self.era == HANDSHAKE:
            resp = await self.http.get(
                self.fleet.mcp_url, headers={**self.headers, "Accept": "text/event-stream"}
            )
        else:
            params = {"notifications": {"resourceSubscriptions": uris}, **self._meta()}
            body = {"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen", "params": params}
            headers = {**self.headers, "Mcp-Method": "subscriptions/listen"}
            resp = await self.http.post(self.fleet.mcp_url, json=body, headers=headers)
        assert resp.status == 200, await resp.text()
        return Reader(resp).start()


async def test_raw_json_rpc_in_both_eras(fleet: Fleet) -> None:
    group = _group()
    inbox = f"exai://link/{group}/inbox"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        a = await _Raw(fleet, http, HANDSHAKE, "raw-a", ALICE).open()
        b = await _Raw(fleet, http, MODERN, "raw-b", ALICE).open()
        c = await _Raw(fleet, http, HANDSHAKE, "raw-c", ALICE).open()
        a_sid = (await a.tool("status", {}))["session"]
        b_sid = (await b.tool("status", {}))["session"]
        assert (await a.tool("link_join", {"group": group}))["inbox"] == inbox
        await b.tool("link_join", {"group": group})
        a_stream, b_stream, c_stream = await a.listen([]), await b.listen([inbox]), await c.listen([])
        try:
            await b_stream.wait_for(1)  # the listen stream's acknowledgement
            await a.tool("link_send", {"group": group, "body": "to all"})
            frames = await b_stream.wait_for(2)
            sub = {"io.modelcontextprotocol/subscriptionId": "listen-1"}
            assert frames[1].data == {
                "jsonrpc": "2.0",
                "method": "notifications/resources/updated",
                "params": {"uri": inbox, "_meta": sub},
            }
            seen = len(a_stream.messages)  # B's join may have come first
            direct = {"group": group, "body": "just you", "to": a_sid, "subject": "s", "thread": "t-1"}
            await b.tool("link_send", direct)
            note = (await a_stream.wait_for(seen + 1))[seen]
            assert note.data == {
                "jsonrpc": "2.0",
                "method": "notifications/resources/updated",
                "params": {"uri": inbox},
            }
            box = await a.tool("link_inbox", {"group": group})
            last = box["events"][-1]
            fields = ("kind", "from", "to", "body", "subject", "thread")
            assert [last[f] for f in fields] == ["message", b_sid, a_sid, "just you", "s", "t-1"]
            # Resource reads over the wire: a member's, and an outsider's refusal in words.
            read = await b.rpc("resources/read", {"uri": inbox})
            events = json.loads(read["result"]["contents"][0]["text"])["events"]
            assert [e["body"] for e in events] == ["to all"]
            refused = await c.rpc("resources/read", {"uri": inbox})
            assert refused["error"]["message"].startswith("[not_linked]"), refused
            listed = await a.rpc("resources/templates/list", {})
            uris = {t["uriTemplate"] for t in listed["result"]["resourceTemplates"]}
            assert "exai://link/{group}/inbox" in uris
            # Arguments of the wrong type are refused, naming the argument.
            bad = await a.tool("link_reserve", {"group": group, "paths": ["x"], "ttl": "soon"})
            assert bad["isError"] is True and "ttl" in bad["content"][0]["text"]
            bad = await a.tool("link_send", {"group": group})
            assert bad["isError"] is True and "body" in bad["content"][0]["text"]
            # The outsider's stream carried nothing of the group (A heard of a later event).
            assert c_stream.messages == []
        finally:
            for stream in (a_stream, b_stream, c_stream):
                await stream.stop()


async def test_concurrent_inbox_reads_of_one_member_return_each_event_once(fleet: Fleet) -> None:
    """A client that pipelines link_inbox calls (or reads from two tabs of one session) still
    gets every event exactly once across them."""
    group = _group()
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="conc-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="conc-b", token=ALICE) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        sent = [(await call(a, "link_send", {"group": group, "body": f"m{i}"}))["event"] for i in range(60)]
        async with asyncio.timeout(20):  # stored a moment after each call answered
            while (await call(b, "link_status", {"group": group}))["unread"] < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        got: list[dict[str, Any]] = []
        for _ in range(3):
            rounds = await asyncio.gather(
                *(call(b, "link_inbox", {"group": group, "limit": 7}) for _ in range(8))
            )
            got += [e for r in rounds for e in r["events"]]
        got += (await call(b, "link_inbox", {"group": group, "limit": 1000}))["events"]
        uuids = [e["uuid"] for e in got]
        assert len(uuids) == len(set(uuids)), "an event was returned twice"
        assert sorted(uuids, key=sent.index) == sent


async def test_more_says_whether_another_page_is_left(fleet: Fleet) -> None:
    """`more` is true only while unread events are left after the page: a page that takes the
    last events exactly says false, so a client paging until `more` is false never asks for an
    empty page; the inbox resource says the same without acknowledging."""
    group = _group()
    async with (
        mcp_client(fleet.mcp_url, "2026-07-28", name="more-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="more-b", token=ALICE) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        for i in range(6):
            await call(a, "link_send", {"group": group, "body": f"p{i}"})
        async with asyncio.timeout(20):
            while (await call(b, "link_status", {"group": group}))["unread"] < 6:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        peek = await call(b, "link_inbox", {"group": group, "limit": 6, "ack": False})
        assert (peek["count"], peek["more"]) == (6, False)
        read = await b.read_resource(f"exai://link/{group}/inbox")
        listed = json.loads(read.contents[0].text)  # type: ignore[union-attr]
        assert (len(listed["events"]), listed["more"]) == (6, False)
        first = await call(b, "link_inbox", {"group": group, "limit": 3})
        assert ([e["body"] for e in first["events"]], first["more"]) == (["p0", "p1", "p2"], True)
        last = await call(b, "link_inbox", {"group": group, "limit": 3})
        assert ([e["body"] for e in last["events"]], last["more"]) == (["p3", "p4", "p5"], False)
        empty = await call(b, "link_inbox", {"group": group, "limit": 3})
        assert (empty["count"], empty["more"]) == (0, False)


async def test_a_header_join_happens_once_per_session(fleet: Fleet) -> None:
    """A client sending Exai-Link-Group joins once; after it leaves (or the admin removes it)
    the header does not put it back, not even when its session moves to another instance."""
    group = _group()
    async with (
        mcp_client(
            fleet.mcp_url, "legacy", name="hdr-a", token=ALICE, headers={"Exai-Link-Group": group}
        ) as a,
        mcp_client(fleet.mcp_url, "legacy", name="hdr-b", token=ALICE) as b,
    ):
        status = await status_of(a)
        assert (await call(a, "link_status"))["groups"] == [group]
        await call(b, "link_join", {"group": group})
        code, _ = await _admin(fleet, "DELETE", f"/admin/links/{group}/members/{status['session']}")
        assert code == 200
        assert (await call(a, "link_status"))["groups"] == []
        # A's instance dies: A resumes on a fresh instance, and still sends the header.
        await asyncio.to_thread(fleet.kill_instance, instance_num(status["instance_id"]))
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(MCPError):  # the call the kill cut: "retry if safe"
                    result = await a.call_tool("link_status", {})
                    if not result.is_error:
                        break
                await asyncio.sleep(0.2)
        assert result.structured_content is not None
        assert result.structured_content["groups"] == []
        members = (await call(b, "link_status", {"group": group}))["members"]
        assert [m["client"] for m in members] == ["hdr-b"]
