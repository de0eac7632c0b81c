"""The MCP SDK's share of one `chat` call, and of `tools/list`, in one process, no network.

    python tests/bench/bench_sdk_call.py [--calls 2000] [--rounds 3] [--profile FILE]
        [--what chat,list] [--eras stateless,handshake]

Builds the instance's real ASGI app (`instance.app.build_app`: the internal-token gate, the
SDK's Streamable HTTP handler, the tool wrapper, every tool registered) without Redis or
Postgres, swaps the `chat` tool's body for one that returns a canned result of a real chat's
shape at once, and drives the gate with hand-made ASGI messages, exactly as uvicorn would hand
it a request. What is measured is then everything of a chat call that is not the chat itself:
the SDK's request parsing and checks, argument validation, our wrapper and guard, the result's
conversion, the JSON-RPC answer's serialization and the ASGI sends (not the socket writes).
Prints CPU µs per call (the event loop thread's CPU time) and the instance's own `sdk_in` /
`sdk_out` stage p50 (instance/timing.py); `list` times `tools/list` the same way, `version`
that tool. `--profile` writes a cProfile of the last round's calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import protocol as p  # noqa: E402
from common.settings import load_settings  # noqa: E402
from instance.app import build_app  # noqa: E402
from instance.runtime import Identity  # noqa: E402
from instance.timing import chat_stages  # noqa: E402
from tests.asgi import call_asgi  # noqa: E402

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
TOKEN = "bench-sdk-token"

ANSWER = (
    "Here is what I would check first. " * 12
    + "\n\n```python\ndef f(x):\n    return x * 2\n```\n\n"
    + "The rest of the reasoning follows, with a few caveats. " * 10
)


def chat_result(prompt: str) -> dict[str, Any]:
    """A chat result with the shape and size the real tool returns on a continued thread."""
    return {
        "status": "continuation_available",
        "content": ANSWER,
        "content_type": "text",
        "continuation_id": "7d6c0e6e-6a4e-4d0f-9a57-3c1b2a9e8f10",
        "metadata": {
            "model": "glm-4.6",
            "provider": "glm",
            "tokens_in": 812,
            "tokens_out": 214,
            "duration_ms": 50.3,
            "attempts": 1,
            "thread_turns": 6,
            "history_turns_dropped": 0,
            "tokens_sent": 812,
            "context": {
                "tokens_sent": 812,
                "history_budget": 96000,
                "stripped": {"chars_before": len(prompt), "chars_after": len(prompt), "blocks": []},
                "history": {
                    "tokens_before": 600,
                    "tokens_after": 600,
                    "turns_total": 4,
                    "turns_verbatim": 4,
                    "turns_compacted": 0,
                    "turns_omitted": 0,
                    "blocks_masked": 0,
                    "sentences_dropped": 0,
                    "summarised": False,
                },
                "blocks": {"notes": 40},
            },
            "files": [],
            "files_disclosed": [],
            "notes_injected": [
                {"scope": "thread:7d6c", "key": "d-1", "kind": "decision", "importance": 3, "version": 1},
            ],
            "notes_omitted": [],
            "notes_captured": [],
            "notes": None,
            "instance_id": "bench-instance",
        },
        "continuation_offer": {
            "continuation_id": "7d6c0e6e-6a4e-4d0f-9a57-3c1b2a9e8f10",
            "remaining_turns": 14,
            "note": "You can continue this conversation for 14 more turns (7 chat calls: each adds two) "
            "by passing this continuation_id to chat.",
        },
    }


def _swap_chat_body(gate: Any) -> None:
    """Replace the registered chat tool's body (the function its wrapper calls)."""
    server = gate.mcp_handler.__self__.app
    mcp = server.get_request_handler("tools/call").handler.__self__
    wrapper = mcp._tool_manager.get_tool("chat").fn
    original = wrapper.__wrapped__

    async def body(*args: Any, **kwargs: Any) -> dict[str, Any]:
        from instance.timing import current_call

        clock = current_call.get()
        if clock is not None:
            clock.started = time.perf_counter()
        return chat_result(kwargs["prompt"])

    for cell in wrapper.__closure__ or ():
        if cell.cell_contents is original:
            cell.cell_contents = body
            return
    raise RuntimeError("could not find the chat body in its wrapper")


def _headers(era: str, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    base = {
        "host": "127.0.0.1:1",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        p.INTERNAL_TOKEN_HEADER.lower(): TOKEN,
        p.SESSION_HEADER.lower(): "bench-session",
        p.PRINCIPAL_HEADER.lower(): "local",
        p.ERA_HEADER.lower(): era,
        p.CLIENT_HEADER.lower(): "bench",
        **{k.lower(): v for k, v in extra.items()},
    }
    return [(k.encode(), v.encode()) for k, v in base.items()]


class Driver:
    """Hand-made ASGI requests to the gate; the answer's body bytes are returned."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate

    async def request(
        self, headers: list[tuple[bytes, bytes]], body: bytes, method: str = "POST"
    ) -> tuple[int, dict[str, str], bytes]:
        answer = await call_asgi(self.gate, headers, body, method)
        # One turn of the event loop, as a server gives it between requests: what a request
        # left scheduled (a cancelled watcher task, a callback) runs, and is counted, here.
        await asyncio.sleep(0)
        return answer


def _sse_payload(body: bytes) -> dict[str, Any]:
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            return dict(json.loads(line[6:]))
    raise RuntimeError(f"no SSE data in {body[:200]!r}")


async def _prepare(driver: Driver, era: str, what: str) -> tuple[list[tuple[bytes, bytes]], Any]:
    """Headers and a body factory for `what` in `era` (the handshake era initializes first)."""
    name = what if what in ("chat", "version") else None
    method = "tools/call" if name else "tools/list"
    if era == "stateless":
        extra = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
        if name:
            extra["Mcp-Name"] = name
        headers = _headers(era, extra)
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    else:
        headers = _headers(era, {})
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "bench"}},
        }
        status, answer_headers, _ = await driver.request(headers, json.dumps(init).encode())
        if status != 200:
            raise RuntimeError(f"initialize: {status}")
        session = answer_headers[p.MCP_SESSION_ID.lower()]
        headers = _headers(era, {p.MCP_SESSION_ID: session, "MCP-Protocol-Version": HANDSHAKE})
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await driver.request(headers, json.dumps(note).encode())
        meta = None

    def body(k: int) -> bytes:
        params: dict[str, Any] = {}
        if name == "chat":
            arguments = {"prompt": f"q {k} about the code", "continuation_id": "t-1"}
            params = {"name": name, "arguments": arguments}
        elif name:
            params = {"name": name, "arguments": {}}
        if meta is not None:
            params["_meta"] = meta
        return json.dumps({"jsonrpc": "2.0", "id": k + 1, "method": method, "params": params}).encode()

    return headers, body


class GcClock:
    """Time the garbage collector spends, from its own callbacks (collections run on this thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full += info.get("generation") == 2


GC = GcClock()


async def _round(
    driver: Driver, era: str, what: str, calls: int, profile: cProfile.Profile | None
) -> dict[str, float]:
    headers, body = await _prepare(driver, era, what)
    bodies = [body(k) for k in range(calls + 20)]
    for k in range(20):
        await driver.request(headers, bodies[k])
    chat_stages.stages["sdk_in"].recent.clear()
    chat_stages.stages["sdk_out"].recent.clear()
    samples = []
    gc0, full0 = GC.seconds, GC.full
    cpu0 = time.thread_time()
    if profile is not None:
        profile.enable()
    for k in range(20, calls + 20):
        started = time.perf_counter()
        status, _h, answer = await driver.request(headers, bodies[k])
        samples.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"{what}: {status} {answer[:300]!r}")
    if profile is not None:
        profile.disable()
    cpu = time.thread_time() - cpu0
    payload = json.loads(answer) if era == "stateless" else _sse_payload(answer)
    if "result" not in payload or payload["result"].get("isError"):
        raise RuntimeError(f"{what}: {answer[:300]!r}")
    out = {
        "cpu_us_per_call": round(cpu * 1e6 / calls, 1),
        "p50_us": round(statistics.median(samples) * 1e6, 1),
        "answer_bytes": len(answer),
        "gc_us_per_call": round((GC.seconds - gc0) * 1e6 / calls, 1),
        "full_collections": GC.full - full0,
    }
    if what == "chat":
        summary = chat_stages.summary()
        out["sdk_in_p50_us"] = round(summary["sdk_in"]["p50_ms"] * 1000, 1)
        out["sdk_out_p50_us"] = round(summary["sdk_out"]["p50_ms"] * 1000, 1)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--what", default="chat,list")
    ap.add_argument("--eras", default="stateless,handshake")
    ap.add_argument("--profile", default="", help="write a cProfile of the last round here")
    args = ap.parse_args()
    settings = load_settings(internal_token=TOKEN, database_url=None, redis_url=None, log_level="WARNING")
    gate, runtime = build_app(settings, Identity(id="bench-instance", host="127.0.0.1", port=1))
    _swap_chat_body(gate)
    manager = gate.mcp_handler.__self__
    driver = Driver(gate)
    results: dict[str, list[dict[str, float]]] = {}
    async with manager.run():
        runtime.set_state("ready")
        for r in range(args.rounds):
            last = r == args.rounds - 1
            for what in args.what.split(","):
                for era in args.eras.split(","):
                    profile = cProfile.Profile() if args.profile and last else None
                    out = await _round(driver, era, what, args.calls, profile)
                    if profile is not None:
                        profile.dump_stats(f"{args.profile}.{what}.{era}")
                    results.setdefault(f"{what} {era}", []).append(out)
                    print(f"round {r} {what:5} {era:9} {out}", flush=True)
    print("\nmedian over rounds:")
    for key, rows in results.items():
        line = "  ".join(f"{k} {statistics.median(x[k] for x in rows):.1f}" for k in rows[0])
        print(f"  {key:16} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
