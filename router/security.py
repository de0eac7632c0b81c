"""Who is calling and whether they may: bearer tokens, principals, Origin, bind address.

Principals name who opened a session; a session answers only to its principal, so a second
token cannot reach a first token's session even if it learns the id. Origin checks stop a web
page in the user's browser from driving the local router through DNS rebinding.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from common.errors import ConfigError, Forbidden, Unauthorized
from common.protocol import ADMIN_PRINCIPAL, principals_of
from common.settings import Settings

LOCAL_PRINCIPAL = "local"
ADMIN_TOKEN_WHERE = (
    "The admin token is EXAI_ADMIN_TOKEN if you set it, else the one `exai up` generated into the "
    "file admin_token in the state folder (EXAI_STATE_DIR, default ~/.local/state/exai): "
    "TOKEN=$(cat ~/.local/state/exai/admin_token)."
)
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to expose /mcp beyond this machine without client tokens."""
    if not is_loopback(settings.router_host) and not settings.auth_tokens:
        raise ConfigError(
            f"EXAI_ROUTER_HOST={settings.router_host} is not a loopback address, so EXAI_AUTH_TOKENS must "
            "list the bearer tokens clients use (name=token, comma-separated)"
        )
    if not settings.internal_token:
        raise ConfigError("EXAI_INTERNAL_TOKEN is not set; instances only accept the router's internal token")


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True)
class Guard:
    """The router's access rules, built once from settings."""

    tokens: dict[str, str]  # token -> principal name
    admin_token: str | None
    origins: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        tokens = principals_of(settings.auth_tokens)
        reserved = sorted(name for name in tokens.values() if name.startswith("@"))
        if reserved:
            raise ConfigError(
                f"EXAI_AUTH_TOKENS: principal names cannot start with '@' ({', '.join(reserved)})"
            )
        return cls(tokens=tokens, admin_token=settings.admin_token, origins=tuple(settings.allowed_origins))

    def principal(self, request: web.Request) -> str:
        """The caller's principal for /mcp; without configured tokens everyone is `local`."""
        if not self.tokens:
            return LOCAL_PRINCIPAL
        token = _bearer(request)
        if token is None:
            raise Unauthorized(
                "Missing bearer token.",
                hint="Send 'Authorization: Bearer <token>' with a token from EXAI_AUTH_TOKENS.",
            )
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return name
        if self.admin_token and hmac.compare_digest(self.admin_token.encode(), token.encode()):
            return ADMIN_PRINCIPAL  # the admin sees every principal's threads, notes and tasks
        raise Unauthorized("Unknown bearer token.", hint="Use a token listed in EXAI_AUTH_TOKENS.")

    def check_admin(self, request: web.Request) -> None:
        if not self.admin_token:
            raise Forbidden("The admin API is disabled.", hint="Set EXAI_ADMIN_TOKEN to enable it.")
        token = _bearer(request)
        if token is None:
            raise Unauthorized(
                "Missing bearer token.", hint=f"Send 'Authorization: Bearer <token>'. {ADMIN_TOKEN_WHERE}"
            )
        if not hmac.compare_digest(self.admin_token.encode(), token.encode()):
            raise Unauthorized("Wrong admin token.", hint=ADMIN_TOKEN_WHERE)

    def check_origin(self, request: web.Request) -> None:
        """Absent Origin (non-browser clients) and loopback origins pass; others must be listed."""
        origin = request.headers.get("Origin")
        if not origin:
            return
        if origin in self.origins:
            return
        for allowed in self.origins:
            if allowed.endswith(":*") and origin.startswith(allowed[:-1]):
                return
        host = urlsplit(origin).hostname
        if host is not None and is_loopback(host):
            return
        raise Forbidden(
            f"Origin {origin!r} is not allowed.",
            hint="Add it to EXAI_ALLOWED_ORIGINS if this browser origin should reach the router.",
        )
