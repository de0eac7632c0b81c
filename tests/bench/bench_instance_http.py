"""An instance's own per-request cost (uvicorn, starlette, the MCP SDK, our middleware), A/B.

    python tests/bench/bench_instance_http.py [--calls 3000] [--rounds 3] [--method call|list]
        [OTHER_BIN ...]

Starts one bare `exai-instance` from this venv and one per OTHER_BIN (another checkout's
`.venv/bin/exai-instance`, to compare builds side by side) on loopback without Redis or
Postgres, then calls the `version` tool (`--method list`: `tools/list`) straight at each (the
router's internal headers, one keep-alive socket, one call at a time, prebuilt raw HTTP/1.1 so
the client costs little), in both eras: 2026-07-28 (stateless JSON answer) and the handshake
era (initialize, then the request answered on an SSE stream). Rounds alternate the order of
the instances. Prints each instance's CPU per call (utime + stime from /proc) and the p50
latency per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import protocol as p  # noqa: E402
from tests.bench.rawwire import build_request, read_head  # noqa: E402

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _request(port: int, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    return build_request(f"http://127.0.0.1:{port}/mcp", json.dumps(body).encode(), headers, version=None)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers = await read_head(reader)
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, b"".join(parts)
        parts.append(chunk[:-2])


class Target:
    """One instance process and a keep-alive socket to it."""

    def __init__(self, binary: str, token: str, workdir: Path) -> None:
        self.binary = str(Path(binary).resolve()) if os.sep in binary else binary
        self.port = _free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("EXAI_") and k not in ("REDIS_URL", "DATABASE_URL")
        }
        env.update(EXAI_INTERNAL_TOKEN=token, EXAI_INSTANCE_PORT=str(self.port), LOG_LEVEL="WARNING")
        self.log = open(workdir / f"instance-{self.port}.log", "wb")
        self.proc = subprocess.Popen([self.binary], env=env, cwd=workdir, stdout=self.log, stderr=self.log)
        self.token = token

    async def ready(self) -> None:
        for _ in range(200):
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.binary} did not listen on {self.port}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


async def _session(
    t: Target, era: str, method: str = "call"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection bound like the router would, and a prebuilt `version` call (or, with
    method "list", a `tools/list`) for it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
    headers = {
        p.INTERNAL_TOKEN_HEADER: t.token,
        p.SESSION_HEADER: "bench-session",
        p.PRINCIPAL_HEADER: "local",
        p.ERA_HEADER: era,
        p.CLIENT_HEADER: "bench",
    }
    listing = method == "list"
    call: dict[str, Any] = {"jsonrpc": "2.0", "id": 7, "method": "tools/list" if listing else "tools/call"}
    if era == "stateless":
        if listing:
            headers.update({"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"})
        else:
            headers.update(
                {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "version"}
            )
        call["params"] = {
            **({} if listing else {"name": "version", "arguments": {}}),
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        }
        return reader, writer, _request(t.port, call, headers)
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "bench"}},
    }
    writer.write(_request(t.port, init, headers))
    status, answer_headers, _ = await _answer(reader)
    if status != 200:
        raise RuntimeError(f"initialize: {status}")
    session = answer_headers[p.MCP_SESSION_ID.lower()]
    headers.update({p.MCP_SESSION_ID: session, "MCP-Protocol-Version": HANDSHAKE})
    writer.write(_request(t.port, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers))
    await _answer(reader)
    if not listing:
        call["params"] = {"name": "version", "arguments": {}}
    return reader, writer, _request(t.port, call, headers)


async def _round(t: Target, era: str, calls: int, method: str = "call") -> dict[str, float]:
    reader, writer, data = await _session(t, era, method)
    for _ in range(50):  # warm up
        writer.write(data)
        await _answer(reader)
    samples = []
    cpu0 = _cpu(t.proc.pid)
    for _ in range(calls):
        started = time.perf_counter()
        writer.write(data)
        status, _h, body = await _answer(reader)
        samples.append(time.perf_counter() - started)
        if status != 200 or b'"isError":true' in body:
            raise RuntimeError(f"{t.binary}: {status} {body[:300]!r}")
    cpu = _cpu(t.proc.pid) - cpu0
    writer.close()
    return {
        "cpu_us_per_call": round(cpu * 1e6 / calls, 1),
        "p50_ms": round(statistics.median(samples) * 1000, 3),
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eras", default="stateless,handshake")
    ap.add_argument(
        "--method", choices=["call", "list"], default="call", help="call: the version tool; list: tools/list"
    )
    ap.add_argument("bins", nargs="*", default=[], help="other builds' exai-instance to compare")
    args = ap.parse_args()
    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="exai-bench-inst-") as tmp:
        own = str(Path(sys.executable).parent / "exai-instance")
        targets = [Target(b, token, Path(tmp)) for b in [own, *args.bins]]
        try:
            for t in targets:
                await t.ready()
            results: dict[str, dict[str, list[dict[str, float]]]] = {}
            for r in range(args.rounds):
                order = targets if r % 2 == 0 else list(reversed(targets))
                for era in args.eras.split(","):
                    for t in order:
                        out = await _round(t, era, args.calls, args.method)
                        results.setdefault(t.binary, {}).setdefault(era, []).append(out)
                        print(f"round {r} {era:9} {t.binary}: {out}", flush=True)
        finally:
            for t in targets:
                t.stop()
    print("\nmedian over rounds: CPU µs per call / p50 ms")
    for binary, eras in results.items():
        for era, rows in eras.items():
            cpu = statistics.median(x["cpu_us_per_call"] for x in rows)
            p50 = statistics.median(x["p50_ms"] for x in rows)
            print(f"  {era:9} {cpu:7.1f} µs  {p50:6.3f} ms  {binary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
