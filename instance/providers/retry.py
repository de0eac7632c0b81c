"""How long to wait before trying a provider again: Retry-After when it says, else backoff.

This is the fleet's only retry layer for provider calls (aiohttp never repeats a POST), so
one request becomes at most EXAI_PROVIDER_MAX_RETRIES + 1 upstream hits, and the waits never
add up to more than EXAI_PROVIDER_RETRY_BUDGET seconds.
"""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def backoff(attempt: int, *, rng: random.Random | None = None) -> float:
    """Exponential backoff with ±20 % jitter for retry number `attempt` (1-based)."""
    base = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    jitter = (rng or random).uniform(0.8, 1.2)
    return base * jitter
