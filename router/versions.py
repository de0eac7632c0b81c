"""Which MCP protocol versions the router accepts, and which era a request belongs to.

Checked before anything is bound: a request with an unknown `MCP-Protocol-Version`, or one
that mixes the eras (an `initialize` sent as 2026-07-28, a 2026-07-28 envelope under a
handshake version), gets a 400 naming the supported versions instead of an instance.
"""

from __future__ import annotations

from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from common.errors import UnsupportedProtocolVersion
from common.protocol import Era
from router.jsonrpc import PROTOCOL_VERSION_META_KEY, Message

HANDSHAKE_VERSIONS = frozenset(HANDSHAKE_PROTOCOL_VERSIONS)
STATELESS_VERSIONS = frozenset(MODERN_PROTOCOL_VERSIONS)
_SUPPORTED = (
    f"Supported: {', '.join(HANDSHAKE_PROTOCOL_VERSIONS)} (initialize handshake, Mcp-Session-Id) "
    f"and {', '.join(MODERN_PROTOCOL_VERSIONS)} (stateless, no initialize)."
)


def _refuse(what: str, request_id: object) -> UnsupportedProtocolVersion:
    return UnsupportedProtocolVersion(
        f"{what}. {_SUPPORTED}",
        hint="Upgrade or configure the client to use one of these protocol versions.",
        request_id=request_id,
        supported=[*HANDSHAKE_PROTOCOL_VERSIONS, *MODERN_PROTOCOL_VERSIONS],
    )


def era_of(header: str | None, msg: Message | None) -> Era:
    """The era of a request from its MCP-Protocol-Version header and body; raises on nonsense."""
    rid = msg.id if msg is not None else None
    meta = msg.meta.get(PROTOCOL_VERSION_META_KEY) if msg is not None else None
    if header is not None and header not in HANDSHAKE_VERSIONS and header not in STATELESS_VERSIONS:
        raise _refuse(f"Unsupported MCP-Protocol-Version {header!r}", rid)
    if meta is not None and meta not in STATELESS_VERSIONS:
        raise _refuse(f"Unsupported protocol version {meta!r} in the request's _meta", rid)
    if header in STATELESS_VERSIONS:
        if msg is not None and msg.method == "initialize":
            raise _refuse(f"initialize belongs to the handshake era, not to {header}", rid)
        if meta is not None and meta != header:
            raise _refuse(f"The request's _meta says {meta!r} but MCP-Protocol-Version says {header!r}", rid)
        return "stateless"
    if meta is not None:
        # A 2026-07-28 envelope without its header, or under a handshake version.
        said = f"MCP-Protocol-Version {header!r}" if header else "no MCP-Protocol-Version header"
        raise _refuse(f"A {meta} request (_meta) with {said}", rid)
    return "handshake"
