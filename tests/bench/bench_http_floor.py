"""The CPU floor of answering one HTTP request in Python: what a router hop cannot go below.

    python tests/bench/bench_http_floor.py [--requests 3000] [--rounds 2]

Four minimal servers answer `POST /mcp` with a fixed 300-byte JSON body over keep-alive
HTTP/1.1: an aiohttp handler and a bare asyncio Protocol with httptools' parser, each on
asyncio's and on uvloop's event loop. One client (aiohttp, in this process) sends the same
requests to each in turn; each server's CPU per request comes from /proc. The router does a
server's work and a client's (towards its instance) per proxied call, so twice the bare figure
is roughly what any Python relay needs, and the aiohttp-minus-bare gap is what
router/fastpath.py can save.

Prints CPU µs per request per server and round, and saves JSON to
tests/bench/results/http-floor-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BODY = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "x" * 200}]}}
).encode()
KINDS = (("aiohttp", "asyncio"), ("aiohttp", "uvloop"), ("bare", "asyncio"), ("bare", "uvloop"))


def serve(kind: str, loop_kind: str, port: int) -> None:
    async def main() -> None:
        if kind == "aiohttp":
            from aiohttp import web

            async def handler(request: web.Request) -> web.Response:
                await request.read()
                return web.Response(body=BODY, content_type="application/json")

            app = web.Application()
            app.router.add_post("/mcp", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        else:
            import httptools  # type: ignore[import-untyped]

            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(
                BODY
            )

            class Proto(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    self.transport: Any = transport
                    self.parser = httptools.HttpRequestParser(self)

                def data_received(self, data: bytes) -> None:
                    self.parser.feed_data(data)

                def on_message_complete(self) -> None:
                    self.transport.write(head + BODY)

            await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port)
        await asyncio.Event().wait()

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def client(port: int, n: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.post(
                f"http://127.0.0.1:{port}/mcp", data=b'{"a":1}', headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    load0 = os.getloadavg()
    out: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for kind, loop_kind in KINDS:
            port = _free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, loop_kind, str(port)])
            try:
                time.sleep(1.0)
                asyncio.run(client(port, 200))  # warm-up
                c0 = _cpu(proc.pid)
                asyncio.run(client(port, args.requests))
                used = _cpu(proc.pid) - c0
            finally:
                proc.terminate()
                proc.wait()
            out.setdefault(f"{kind}/{loop_kind}", []).append(round(used * 1e6 / args.requests, 1))
    print(f"load average before {load0}, after {os.getloadavg()}")
    for name, values in out.items():
        print(f"{name:>16}: {', '.join(f'{v:.0f}' for v in values)} µs CPU per request")
    result = {
        "cpu_us_per_request": out,
        "meta": {"requests": args.requests, "loadavg_before": load0, "loadavg_after": os.getloadavg()},
    }
    path = ROOT / "tests" / "bench" / "results" / f"http-floor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        raise SystemExit(0)
    raise SystemExit(main())
