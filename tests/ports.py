"""Free loopback ports for the processes tests start.

Blocks of ports (instances listen on base+1 .. base+N) are picked below the kernel's ephemeral
range (32768+ on Linux), where outgoing connections of the test run itself cannot be sitting.
"""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A port the kernel says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """A base port such that base+1 .. base+count are all free."""
    for _ in range(500):
        base = random.randrange(20000, 32000 - count)
        if all(port_free(base + n) for n in range(1, count + 1)):
            return base
    raise RuntimeError(f"no block of {count} free ports found")
