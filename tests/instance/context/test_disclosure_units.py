"""The pure parts of phase 4: file specs, byte-exact slices, outlines, the ledger's rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidArgument
from instance.context import disclosure
from instance.context.outline import outline


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b.py", disclosure.FileSpec("/a/b.py")),
        ("/a/b.py:10-40", disclosure.FileSpec("/a/b.py", 10, 40)),
        ("/a/b:c.py:3-3", disclosure.FileSpec("/a/b:c.py", 3, 3)),
        ({"path": "/a/b.py", "start_line": 2, "end_line": 5}, disclosure.FileSpec("/a/b.py", 2, 5)),
        ({"path": "/a/b.py"}, disclosure.FileSpec("/a/b.py")),
    ],
)
def test_file_specs(raw: Any, expected: disclosure.FileSpec) -> None:
    assert disclosure.parse_spec(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("/a/b.py:40-10", "not valid"),
        ("/a/b.py:0-3", "not valid"),
        ({"path": "/a/b.py", "start_line": 2}, "both start_line and end_line"),
        ({"start_line": 2, "end_line": 3}, "'path'"),
        ({"path": "/a", "start_line": "x", "end_line": 3}, "integers"),
        (42, "path string or an object"),
    ],
)
def test_bad_file_specs(raw: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        disclosure.parse_spec(raw)


def test_line_slice_is_byte_exact() -> None:
    data = b"a\r\nb\n\nd\ne"
    assert disclosure.line_slice(data, 1, 1) == b"a\r\n"
    assert disclosure.line_slice(data, 2, 4) == b"b\n\nd\n"
    assert disclosure.line_slice(data, 5, 9) == b"e"
    assert disclosure.line_slice(b"x\n", 1, 2) == b"x\n"


def test_outline_falls_back_to_plain_text_for_broken_python() -> None:
    o = outline("/x/broken.py", "def ok():\n    pass\nclass (:\n")
    assert o.parser == "plain" and [s.start for s in o.symbols] == [1, 3]


def test_outline_gets_coarser_to_fit_its_budget() -> None:
    method = "    def m{j}(self, a: int, b: str = 'x') -> bool:\n        return True\n"
    source = "".join(
        f"class C{i}(Base):\n" + "".join(method.format(j=j) for j in range(5)) for i in range(10)
    )
    o = outline("/x/many.py", source)
    full = o.render("full")
    assert "m4(a: int, b: str='x') -> bool" in full
    assert o.fit(len(full) // 4 * 3 // 4, lambda t: len(t) // 4)[1] == "brief"
    text, detail = o.fit(len(full) // 20, lambda t: len(t) // 4)
    assert detail in ("names", "top") and "class C9(Base)" in text and len(text) <= len(full) / 5
    assert o.fit(10_000, len)[1] == "full"


def test_typescript_arrow_functions_and_javascript() -> None:
    o = outline("/x/a.js", "export const f = async (a, b) => {\n  return a;\n};\nfunction g() {}\n")
    assert (o.language, o.parser) == ("javascript", "tree-sitter")
    assert [(s.kind, s.name, s.start, s.end) for s in o.symbols] == [
        ("function", "f", 1, 3),
        ("function", "g", 4, 4),
    ]


@dataclass
class _Turn:
    role: str
    content: str
    metadata: dict[str, Any] = field(default_factory=dict)


async def test_history_replaces_older_copies_even_when_the_prefix_moved(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text("X = 1\n")
    first = await disclosure.disclose([], [str(path)], roots=[tmp_path], model="glm-4.6")
    # The turn was stored with a different prefix than the span assumed (e.g. after stripping).
    stored = _Turn("user", "a much longer prompt than before\n\n" + first.block,
                   {disclosure.META_KEY: first.metadata(len("q"))})  # fmt: skip
    history = [stored, _Turn("assistant", "ok")]
    again = await disclosure.disclose(history, [str(path)], roots=[tmp_path], model="glm-4.6")
    assert again.report[0]["status"] == "referred"
    path.write_text("X = 2\n")
    changed = await disclosure.disclose(history, [str(path)], roots=[tmp_path], model="glm-4.6")
    assert changed.report[0]["status"] == "sent" and "X = 2" in changed.block
    rendered = disclosure.history_messages(history, changed)
    assert "X = 1" not in rendered[0]["content"] and 'superseded="yes"' in rendered[0]["content"]
    assert rendered[0]["content"].startswith("a much longer prompt than before\n\n<file ")
    unchanged = disclosure.history_messages(history, again)
    assert "X = 1" in unchanged[0]["content"]
