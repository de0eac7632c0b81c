"""Pre-flight checks of `exai up`: one line naming the variable to fix when a port is taken or
the configured Redis does not answer.
"""

from __future__ import annotations

import errno
import socket

from common.errors import ConfigError
from common.fleet.services import Services, where
from common.settings import Settings


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same options as the servers: a port in TIME_WAIT after `exai down` is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_ports(settings: Settings, services: Services) -> None:
    """Fail with one line naming the variable if a port the fleet needs is taken."""
    wanted: list[tuple[str, int, str]] = [(settings.router_host, settings.router_port, "EXAI_ROUTER_PORT")]
    if services.postgres is not None:
        wanted.append(("127.0.0.1", services.postgres.port, "EXAI_EMBEDDED_PG_PORT"))
    if services.redis is not None:
        wanted.append(("127.0.0.1", services.redis.port, "EXAI_EMBEDDED_REDIS_PORT"))
    for num in range(1, settings.max_instances + 1):
        wanted.append((settings.instance_host, settings.instance_port_for(num), "EXAI_INSTANCE_BASE_PORT"))
    for host, port, var in wanted:
        if port > 65535:
            raise ConfigError(f"{var}: port {port} is above 65535.", hint="Choose a lower port.")
        if not _port_free(host, port):
            raise ConfigError(
                f"{var}: port {port} on {host} is already in use.",
                hint=f"Stop what listens there, or set {var} to a free port.",
            )


def check_redis(url: str) -> None:
    """Fail with one line if the configured Redis does not answer PING."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except (redis_sync.RedisError, OSError) as exc:
        raise ConfigError(
            f"REDIS_URL: cannot reach Redis at {where(url)} ({exc}).",
            hint="Start Redis there, fix REDIS_URL, or unset it to use the embedded Redis.",
        ) from None
    finally:
        client.close()
