"""A listen stream renders each change kind once and writes the same frame the SDK's models give."""

from __future__ import annotations

from mcp_types import SubscriptionFilter

from common.notifications import Event
from router import streams
from router.streams import Listen

INBOX = "exai://link/g/inbox"


def _ev(event_id: str, method: str, params: dict[str, object] | None = None) -> Event:
    message: dict[str, object] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return Event(event_id, message)


def test_change_frames_are_rendered_once_and_stamped_per_event() -> None:
    listen = Listen(
        "tok", "sid", 7, SubscriptionFilter(resource_subscriptions=[INBOX], tools_list_changed=True)
    )
    first = listen.frame(_ev("1-0", "notifications/resources/updated", {"uri": INBOX}))
    second = listen.frame(_ev("1-1", "notifications/resources/updated", {"uri": INBOX}))
    assert first == (
        b'id: tok.1-0\r\nevent: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/resources/updated",'
        b'"params":{"_meta":{"io.modelcontextprotocol/subscriptionId":7},"uri":"exai://link/g/inbox"}}\r\n\r\n'
    )
    assert second == first.replace(b"tok.1-0", b"tok.1-1")
    tools = listen.frame(_ev("1-2", "notifications/tools/list_changed"))
    assert tools is not None and b'"method":"notifications/tools/list_changed"' in tools
    # Not asked for: nothing, cached or not.
    for _ in range(2):
        assert listen.frame(_ev("1-3", "notifications/resources/updated", {"uri": "exai://other"})) is None
        assert listen.frame(_ev("1-4", "notifications/prompts/list_changed")) is None
        assert listen.frame(_ev("1-5", "notifications/message", {"level": "info"})) is None


def test_the_rendered_kinds_are_bounded() -> None:
    listen = Listen("tok", "sid", 1, SubscriptionFilter(resource_subscriptions=[INBOX]))
    for i in range(streams.LISTEN_FRAME_CACHE * 3):
        assert (
            listen.frame(_ev(f"1-{i}", "notifications/resources/updated", {"uri": f"exai://x/{i}"})) is None
        )
    assert len(listen._data) == streams.LISTEN_FRAME_CACHE
    assert listen.frame(_ev("2-0", "notifications/resources/updated", {"uri": INBOX})) is not None
