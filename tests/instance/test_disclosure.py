"""Context phase 4 end to end: outlines, exact ranges, each file once per thread, roots enforced.

What the model received is read from the fake provider; the file tools are called through
real SDK clients.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
from mcp_types import CallToolResult

from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import ERAS, InstanceProc, connect, new_session

PYTHON = '''"""A module."""

import os

LIMIT = 10


class Store(Base):
    """Keeps things."""

    def get(self, key: str) -> bytes:
        return b""

    async def put(self, key: str, value: bytes) -> None:
        pass


def helper(x: int, *, flag: bool = False) -> int:
    return x
'''

TYPESCRIPT = """import { x } from "./x";

export const MAX_ITEMS = 10;

export interface Shape {
  area(): number;
}

export class Circle implements Shape {
  constructor(private readonly r: number) {}
  area(): number {
    return Math.PI * this.r * this.r;
  }
}

export function total(shapes: Shape[]): number {
  return shapes.reduce((s, x) => s + x.area(), 0);
}
"""

MARKDOWN = """# Guide

Intro.

## Install

```sh
# not a heading
pip install x
```

## Use

### Details

Text.
"""


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, " ".join(getattr(c, "text", "") for c in result.content)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _error(result: CallToolResult) -> str:
    assert result.is_error, result
    return " ".join(getattr(c, "text", "") for c in result.content)


def _big_python(marker: str, functions: int = 40) -> str:
    """A Python file well above the whole-file threshold, with `marker` in every body."""
    parts = [f'"""Generated module {marker}."""\n\n']
    for i in range(functions):
        parts.append(
            f"def function_{i}(value: int, scale: float = 1.0) -> float:\n"
            f'    """Scale value number {i}."""\n'
            f"    result = value * scale + {i}  # {marker}\n"
            + "".join(
                f"    result = result * {k} - (value + {k}) / (scale + {k})  # step {k}\n" for k in range(8)
            )
            + "    return result\n\n\n"
        )
    return "".join(parts)


def _fresh_dir(root: Path) -> Path:
    d = root / f"d{secrets.token_hex(4)}"
    d.mkdir()
    return d


@pytest.mark.parametrize("mode", ERAS)
async def test_outlines_for_python_typescript_and_markdown(
    instance_a: InstanceProc, allowed_root: Path, mode: str
) -> None:
    d = _fresh_dir(allowed_root)
    (d / "store.py").write_text(PYTHON)
    (d / "shapes.ts").write_text(TYPESCRIPT)
    (d / "guide.md").write_text(MARKDOWN)
    async with connect(instance_a, mode, session=new_session()) as client:
        py = _ok(await client.call_tool("file_outline", {"path": str(d / "store.py")}))
        ts = _ok(await client.call_tool("file_outline", {"path": str(d / "shapes.ts")}))
        md = _ok(await client.call_tool("file_outline", {"path": str(d / "guide.md")}))

    def table(o: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
        return [(s["kind"], s["name"], s["lines"]) for s in o["symbols"]]

    assert (py["parser"], py["language"]) == ("ast", "python")
    assert table(py) == [
        ("constant", "LIMIT", [5, 5]),
        ("class", "Store", [8, 15]),
        ("method", "get", [11, 12]),
        ("method", "put", [14, 15]),
        ("function", "helper", [18, 19]),
    ]
    assert "18-19 helper(x: int, *, flag: bool=False) -> int" in py["outline"]
    assert "  14-15 async put(key: str, value: bytes)\n" in py["outline"]

    assert (ts["parser"], ts["language"]) == ("tree-sitter", "typescript")
    assert table(ts) == [
        ("constant", "MAX_ITEMS", [3, 3]),
        ("interface", "Shape", [5, 7]),
        ("method", "area", [6, 6]),
        ("class", "Circle", [9, 14]),
        ("method", "constructor", [10, 10]),
        ("method", "area", [11, 13]),
        ("function", "total", [16, 18]),
    ]
    assert "export function total(shapes: Shape[]): number" in ts["outline"]

    assert md["parser"] == "headings"
    assert table(md) == [
        ("heading", "Guide", [1, 16]),
        ("heading", "Install", [5, 11]),
        ("heading", "Use", [12, 16]),
        ("heading", "Details", [14, 16]),
    ]


async def test_chat_sends_an_outline_first_then_exact_ranges(
    fake: FakeProvider, instance_a: InstanceProc, allowed_root: Path
) -> None:
    path = _fresh_dir(allowed_root) / "big.py"
    source = _big_python("ZEBRA")
    path.write_text(source)
    async with connect(instance_a, "legacy", session=new_session()) as client:
        first = _ok(await client.call_tool("chat", {"prompt": "review", "files": [str(path)]}))
        sent = fake.snapshot()[-1].messages[-1]["content"]
        assert "ZEBRA" not in sent, "an outline carries no function bodies"
        assert re.search(r"\n\d+-\d+ function_39\(value", sent), sent
        [report] = first["metadata"]["files_disclosed"]
        assert (report["part"], report["status"]) == ("outline", "sent")
        assert report["tokens"] <= report["file_tokens"] * 0.25
        cid = first["continuation_id"]
        ranged = _ok(
            await client.call_tool(
                "chat", {"prompt": "show me", "continuation_id": cid, "files": [f"{path}:9-12"]}
            )
        )
    assert ranged["metadata"]["files_disclosed"][0]["part"] == "lines"
    sent = fake.snapshot()[-1].messages[-1]["content"]
    m = re.search(r'lines="9-12">\n(.*?)</file>', sent, re.S)
    assert m is not None, sent
    expected = b"".join(line + b"\n" for line in path.read_bytes().split(b"\n")[8:12])
    assert m.group(1).encode() == expected


async def test_range_request_returns_exactly_those_bytes(
    instance_a: InstanceProc, allowed_root: Path
) -> None:
    path = _fresh_dir(allowed_root) / "mixed.txt"
    data = "one\r\ntwo — ünïcode\r\n\tthree  \n\nfive\nsix without newline".encode()
    path.write_bytes(data)
    async with connect(instance_a, "2026-07-28", session=new_session()) as client:
        middle = _ok(await client.call_tool("file_read", {"path": str(path), "start_line": 2, "end_line": 4}))
        tail = _ok(await client.call_tool("file_read", {"path": str(path), "start_line": 5}))
        beyond = await client.call_tool("file_read", {"path": str(path), "start_line": 40})
    assert middle["text"].encode() == "two — ünïcode\r\n\tthree  \n\n".encode()
    assert tail["text"].encode() == b"five\nsix without newline"
    assert middle["lines"] == [2, 4] and middle["total_lines"] == 6
    assert "not in" in _error(beyond)


async def test_an_unchanged_file_is_sent_once_in_five_turns(
    fake: FakeProvider, instance_a: InstanceProc, instance_b: InstanceProc, allowed_root: Path
) -> None:
    fake.default = Behaviour(content="noted")  # the default echo would repeat the files
    d = _fresh_dir(allowed_root)
    small, big = d / "small.py", d / "big.py"
    small.write_text("SMALL_MARKER = 'KOALA'\n")
    big.write_text(_big_python("WOMBAT"))
    files = [str(small), str(big), f"{big}:1-2"]
    cid = None
    for turn in range(5):
        inst = instance_a if turn % 2 == 0 else instance_b  # the ledger travels with the thread
        async with connect(inst, "legacy", session=new_session()) as client:
            args: dict[str, Any] = {"prompt": f"turn {turn}", "files": files}
            if cid:
                args["continuation_id"] = cid
            result = _ok(await client.call_tool("chat", args))
        cid = result["continuation_id"]
        statuses = [r["status"] for r in result["metadata"]["files_disclosed"]]
        assert statuses == (["sent"] * 3 if turn == 0 else ["referred"] * 3), (turn, statuses)
        everything = "\n".join(m["content"] for m in fake.snapshot()[-1].messages)
        assert everything.count("SMALL_MARKER = 'KOALA'") == 1, turn
        assert everything.count(" function_0(value") == 1, turn  # in the outline only
        assert everything.count("Generated module WOMBAT") == 1, turn  # the 1-2 range, once
    # The file changes: the new copy goes in, the old one leaves the prompt (newest wins).
    small.write_text("SMALL_MARKER = 'PLATYPUS'\n")
    async with connect(instance_a, "legacy", session=new_session()) as client:
        changed = _ok(
            await client.call_tool("chat", {"prompt": "again", "continuation_id": cid, "files": files})
        )
    assert [r["status"] for r in changed["metadata"]["files_disclosed"]] == ["sent", "referred", "referred"]
    everything = "\n".join(m["content"] for m in fake.snapshot()[-1].messages)
    assert "KOALA" not in everything and everything.count("PLATYPUS") == 1
    assert 'superseded="yes"' in everything


async def test_paths_leaving_the_root_are_refused(
    fake: FakeProvider, instance_a: InstanceProc, allowed_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP-SECRET\n")
    d = _fresh_dir(allowed_root)
    link = d / "link.txt"
    os.symlink(outside, link)
    (d / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    dotdot = f"{d}/../../{tmp_path.name}/secret.txt"
    attempts = [str(link), str(d / "linkdir" / "secret.txt"), dotdot, f"{link}:1-1"]
    async with connect(instance_a, "legacy", session=new_session()) as client:
        for path in attempts:
            refused = await client.call_tool("chat", {"prompt": "read it", "files": [path]})
            assert "outside the allowed roots" in _error(refused), path
        for tool, args in (("file_read", {"path": str(link)}), ("file_outline", {"path": dotdot})):
            assert "outside the allowed roots" in _error(await client.call_tool(tool, args))
    assert not any("TOP-SECRET" in str(h.body) for h in fake.snapshot())
