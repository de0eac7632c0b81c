"""`exai-bridge [URL] [--session NAME] [--token TOKEN]`: a stdio MCP server in front of the router.

A drop-in for a client's stdio entry: the client starts it, writes JSON-RPC lines on its stdin
and reads them from its stdout; stderr carries only what a person should read (router down,
token refused). It exits with 0 when the client closes stdin (or on SIGTERM/SIGINT), after
ending its session on the router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
from collections.abc import Sequence

from common.bridge.relay import Relay
from common.bridge.stdio import LineReader, LineWriter
from common.entry import run_entry
from common.errors import ParseError
from common.protocol import MCP_PATH
from common.settings import Settings, load_settings

PROG = "exai-bridge"


def default_url(settings: Settings) -> str:
    host = settings.router_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.router_port}{MCP_PATH}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Relay a stdio MCP client to the EXAI router (Streamable HTTP), one session per process.",
    )
    parser.add_argument(
        "url", nargs="?", help="router MCP URL (default: EXAI_BRIDGE_URL, else this machine's router)"
    )
    parser.add_argument(
        "--session", help="session name, X-Exai-Session-Key (default: EXAI_BRIDGE_SESSION, else a new one)"
    )
    parser.add_argument("--token", help="bearer token (default: EXAI_BRIDGE_TOKEN)")
    return parser


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run(relay: Relay, reader: LineReader, writer: LineWriter) -> int:
    """Pump stdin into the relay until end of input or a stop signal; then close cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def pump() -> None:
        while (line := await reader.readline()) is not None:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError as exc:
                await writer.write(ParseError(f"Parse error: {exc}.").to_jsonrpc(None))
                continue
            await relay.handle(message)

    reading = asyncio.create_task(pump(), name="stdin")
    stopping = asyncio.create_task(stop.wait(), name="signal")
    await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (reading, stopping):
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await relay.close()
    writer.close()
    return 0


async def _main_async(args: argparse.Namespace, settings: Settings) -> int:
    url = args.url or settings.bridge_url or default_url(settings)
    session = args.session or settings.bridge_session or f"bridge-{secrets.token_hex(6)}"
    token = args.token or settings.bridge_token
    reader = await LineReader.open()
    writer = await LineWriter.open()
    relay = Relay(
        url=url,
        write=writer.write,
        session=session,
        token=token,
        retry_seconds=settings.bridge_retry_seconds,
        say=_say,
    )
    _say(f"{PROG}: relaying stdio to {url} (session {session})")
    return await run(relay, reader, writer)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{PROG}: %(message)s")
    return asyncio.run(_main_async(args, settings))


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry(lambda: _main(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
