"""The control plane's view of the fleet's Redis: which instances registered and are ready or
busy, and the keys `exai scale` and `exai up` set (the instance ceiling, the draining set).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.errors import FleetControlError
from common.fleet.services import where
from common.keys import Keys
from common.protocol import DEFAULT_INSTANCE_HOST, local_name


def registered_instances(redis_url: str, prefix: str, host: str = DEFAULT_INSTANCE_HOST) -> set[str]:
    """Process names of this host's instances (advertised at `host`) whose registry entry is
    alive and ready; other hosts' instances in the same registry are left out."""
    import redis as redis_sync

    keys = Keys(prefix)
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3)
    try:
        ready = set()
        for member in client.smembers(keys.instances()):  # type: ignore[union-attr]
            name = local_name(str(member), host)
            if name is not None and client.hget(keys.instance(str(member)), "state") == "ready":
                ready.add(name)
        return ready
    except (redis_sync.RedisError, OSError) as exc:
        raise FleetControlError(f"cannot read the instance registry at {where(redis_url)}: {exc}.") from None
    finally:
        client.close()


def busy_instances(redis_url: str, prefix: str, host: str = DEFAULT_INSTANCE_HOST) -> set[str]:
    """Process names of this host's instances bound to a session (best effort: empty when Redis
    is unreachable)."""
    import redis as redis_sync

    keys = Keys(prefix)
    try:
        client = redis_sync.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3)
        try:
            busy = set()
            for member in client.smembers(keys.instances()):  # type: ignore[union-attr]
                name = local_name(str(member), host)
                if name is not None and client.hget(keys.instance(str(member)), "session"):
                    busy.add(name)
            return busy
        finally:
            client.close()
    except (redis_sync.RedisError, OSError):
        return set()


def control_keys(redis_url: str, prefix: str, fn: Callable[[Any, Keys], None]) -> str | None:
    """Run `fn(redis, keys)` on the fleet's Redis; the error text if Redis is unreachable."""
    import redis as redis_sync

    try:
        client = redis_sync.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3)
        try:
            fn(client, Keys(prefix))
        finally:
            client.close()
    except (redis_sync.RedisError, OSError) as exc:
        return str(exc)
    return None


def forget_scale_state(r: Any, keys: Keys) -> None:
    """A fresh `exai up`: no ceiling from an old `exai scale`, nothing left draining."""
    r.delete(keys.instance_cap(), keys.draining())
