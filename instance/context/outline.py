"""Outlines of source files: the symbols a model needs to decide which lines to ask for.

An outline lists classes, functions, methods and top-level constants (headings for Markdown)
with their 1-based line ranges and one-line signatures. Real parsers do the work: `ast` for
Python, tree-sitter grammars (PyPI wheels, offline) for TypeScript and JavaScript; anything
else, or a file a parser rejects, gets a plain-text outline of definition-like lines and
paragraph starts, so every file has an outline.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Detail = Literal["full", "brief", "names", "top"]
DETAILS: tuple[Detail, ...] = ("full", "brief", "names", "top")

SIGNATURE_MAX = 160
"""Characters of a signature kept in an outline; longer ones end with an ellipsis."""
DEFAULT_MAX = 12
"""A parameter default longer than this shows as `…`."""
CONSTANT_RUN = 4
CONSTANT_NAMES = 8
CONSTANT_MAX = 100
"""Characters of a constant's `NAME = value` kept; values are for recognition, not reading."""
PLAIN_MAX_ENTRIES = 60

_PY_SUFFIXES = (".py", ".pyi")
_TS_SUFFIXES = {".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx"}
_JS_SUFFIXES = (".js", ".jsx", ".mjs", ".cjs")
_MD_SUFFIXES = (".md", ".markdown", ".mdx")


@dataclass(frozen=True, slots=True)
class Symbol:
    kind: str
    name: str
    start: int
    end: int
    signature: str
    depth: int = 0
    brief: str = ""  # the signature without types and defaults; empty: same as signature

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "lines": [self.start, self.end],
            "signature": self.signature,
            "depth": self.depth,
        }


@dataclass(frozen=True, slots=True)
class Outline:
    language: str
    parser: str
    lines: int
    symbols: list[Symbol] = field(default_factory=list)

    def render(self, detail: Detail = "full") -> str:
        """One line per symbol, indented by nesting: `12-40 class Foo(Base)` (1-based lines).

        Coarser details for big files: "brief" drops parameter types and defaults, "names"
        folds a class's members into its line as `name line`, "top" keeps top-level symbols.
        """
        out = []
        symbols = self.symbols
        for i, s in enumerate(symbols):
            if s.depth > 0 and detail in ("names", "top"):
                continue
            where = f"{s.start}" if s.start == s.end else f"{s.start}-{s.end}"
            text = s.signature if detail == "full" else (s.brief or s.signature)
            if detail in ("names", "top"):
                members = []
                for child in symbols[i + 1 :]:
                    if child.depth == 0:
                        break
                    if child.depth == 1:
                        members.append(child)
                if members and detail == "names":
                    text += ": " + ", ".join(f"{m.name} {m.start}" for m in members)
                elif members:
                    text += f" ({len(members)} members)"
            out.append(f"{'  ' * s.depth}{where} {text}")
        return "\n".join(out)

    def fit(self, max_tokens: int, count: Callable[[str], int]) -> tuple[str, Detail]:
        """The most detailed rendering within `max_tokens` (the coarsest one if none fits)."""
        text = ""
        for detail in DETAILS:
            text = self.render(detail)
            if count(text) <= max_tokens:
                return text, detail
        return text, DETAILS[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "language": self.language,
            "parser": self.parser,
            "lines": self.lines,
            "symbols": [s.to_dict() for s in self.symbols],
        }


def _clip(text: str) -> str:
    one = " ".join(text.split())
    return one if len(one) <= SIGNATURE_MAX else one[: SIGNATURE_MAX - 1] + "…"


def line_count(text: str) -> int:
    if not text:
        return 0
    return text.count("\n") + (0 if text.endswith("\n") else 1)


def outline(path: str, text: str) -> Outline:
    """The outline of `text`, chosen by the suffix of `path`; never raises on bad input."""
    lower = path.lower()
    lines = line_count(text)
    if lower.endswith(_PY_SUFFIXES):
        try:
            return Outline("python", "ast", lines, _python(ast.parse(text)))
        except (SyntaxError, ValueError, RecursionError):
            pass
    elif lower.endswith(_MD_SUFFIXES):
        return Outline("markdown", "headings", lines, _markdown(text))
    else:
        suffix = "." + lower.rsplit(".", 1)[-1] if "." in lower else ""
        grammar = _TS_SUFFIXES.get(suffix) or ("tsx" if suffix in _JS_SUFFIXES else None)
        if grammar is not None:
            symbols = _tree_sitter(grammar, text)
            if symbols is not None:
                return Outline("typescript" if suffix not in _JS_SUFFIXES else "javascript",
                               "tree-sitter", lines, symbols)  # fmt: skip
    return Outline("text", "plain", lines, _plain(text))


# --- Python ----------------------------------------------------------------------------------


def _py_args(args: ast.arguments, *, method: bool) -> str:
    """Parameters as written, minus `self`/`cls`, with long defaults shortened to `…`."""
    args = ast.arguments(
        posonlyargs=list(args.posonlyargs),
        args=list(args.args),
        vararg=args.vararg,
        kwonlyargs=list(args.kwonlyargs),
        kw_defaults=[
            d if d is None or len(ast.unparse(d)) <= DEFAULT_MAX else ast.Constant(...)
            for d in args.kw_defaults
        ],
        kwarg=args.kwarg,
        defaults=[d if len(ast.unparse(d)) <= DEFAULT_MAX else ast.Constant(...) for d in args.defaults],
    )
    first = args.posonlyargs or args.args
    if method and first and first[0].arg in ("self", "cls"):
        first.pop(0)
    return ast.unparse(args).replace("Ellipsis", "…")


def _private(name: str) -> bool:
    return name.startswith("_") and name not in ("__init__", "__call__")


def _py_brief(node: ast.FunctionDef | ast.AsyncFunctionDef, *, method: bool) -> str:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    if method and names and names[0] in ("self", "cls"):
        names.pop(0)
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
    prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    return _clip(f"{prefix}{node.name}({', '.join(names)})")


def _py_def(node: ast.FunctionDef | ast.AsyncFunctionDef, *, method: bool) -> str:
    # `def` and `-> None` are left out: the indentation says function or method, and most
    # methods return None. What remains is what a reader needs to choose lines.
    prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    if _private(node.name):  # helpers and protocol methods: the name says enough to ask for lines
        return f"{prefix}{node.name}(…)"
    returns = ast.unparse(node.returns) if node.returns is not None else "None"
    tail = "" if returns == "None" else f" -> {returns}"
    return _clip(f"{prefix}{node.name}({_py_args(node.args, method=method)}){tail}")


def _py_class(node: ast.ClassDef) -> str:
    bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    return _clip(f"class {node.name}({', '.join(bases)})" if bases else f"class {node.name}")


def _py_constant(node: ast.Assign | ast.AnnAssign) -> tuple[str, str] | None:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    if len(names) != 1 or not (names[0].isupper() or isinstance(node, ast.AnnAssign)):
        return None
    return names[0], _clip(ast.unparse(node)[:CONSTANT_MAX])


def _python(tree: ast.Module) -> list[Symbol]:
    def walk(body: list[ast.stmt], depth: int, in_class: bool) -> Iterator[Symbol]:
        seen_overloads: set[str] = set()
        for node in body:
            end = node.end_lineno or node.lineno
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            if isinstance(node, ast.ClassDef):
                yield Symbol("class", node.name, start, end, _py_class(node), depth)
                yield from walk(node.body, depth + 1, True)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if any(ast.unparse(d).endswith("overload") for d in node.decorator_list):
                    seen_overloads.add(node.name)  # the implementation that follows stands for them
                    continue
                kind = "method" if in_class else "function"
                sig, brief = _py_def(node, method=in_class), _py_brief(node, method=in_class)
                yield Symbol(kind, node.name, start, end, sig, depth, brief if sig != brief else "")
            elif isinstance(node, ast.Assign | ast.AnnAssign) and (depth == 0 or in_class):
                found = _py_constant(node)
                if found is not None and (depth == 0 or found[0].isupper()):
                    yield Symbol("constant", found[0], start, end, found[1], depth)

    return _group_constants(list(walk(tree.body, 0, False)))


def _group_constants(symbols: list[Symbol]) -> list[Symbol]:
    """A run of CONSTANT_RUN or more constants becomes one line of names (tables of codes, headers)."""
    out: list[Symbol] = []
    i = 0
    while i < len(symbols):
        j = i
        while j < len(symbols) and symbols[j].kind == "constant" and symbols[j].depth == symbols[i].depth:
            j += 1
        run = symbols[i:j]
        if len(run) >= CONSTANT_RUN:
            names = [s.name for s in run]
            shown = ", ".join(names[:CONSTANT_NAMES]) + (
                f", +{len(names) - CONSTANT_NAMES} more" if len(names) > CONSTANT_NAMES else ""
            )
            out.append(
                Symbol(
                    "constants",
                    names[0],
                    run[0].start,
                    run[-1].end,
                    _clip(f"constants: {shown}"),
                    run[0].depth,
                )
            )
            i = j
        elif run:
            out.extend(run)
            i = j
        else:
            out.append(symbols[i])
            i += 1
    return out


# --- Markdown --------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")


def _markdown(text: str) -> list[Symbol]:
    lines = text.splitlines()
    found: list[tuple[int, int, str]] = []  # (line, level, title)
    fence: str | None = None
    for i, line in enumerate(lines, 1):
        m = _FENCE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence:
            continue
        atx = _ATX.match(line)
        if atx:
            found.append((i, len(atx.group(1)), atx.group(2)))
        elif i > 1 and _SETEXT.match(line) and lines[i - 2].strip() and not _ATX.match(lines[i - 2]):
            level = 1 if line.strip().startswith("=") else 2
            found.append((i - 1, level, lines[i - 2].strip()))
    total = len(lines)
    out = []
    for n, (start, level, title) in enumerate(found):
        end = next((s - 1 for s, lv, _ in found[n + 1 :] if lv <= level), total)
        out.append(
            Symbol("heading", title, start, max(start, end), _clip("#" * level + " " + title), level - 1)
        )
    return out


# --- tree-sitter (TypeScript, TSX, JavaScript) -----------------------------------------------


@functools.cache
def _ts_parser(grammar: str) -> Any | None:
    try:
        import tree_sitter
        import tree_sitter_typescript
    except ImportError:
        return None
    lang = (
        tree_sitter_typescript.language_tsx()
        if grammar == "tsx"
        else tree_sitter_typescript.language_typescript()
    )
    return tree_sitter.Parser(tree_sitter.Language(lang))


_TS_KINDS = {
    "function_declaration": "function",
    "generator_function_declaration": "function",
    "class_declaration": "class",
    "abstract_class_declaration": "class",
    "interface_declaration": "interface",
    "type_alias_declaration": "type",
    "enum_declaration": "enum",
    "internal_module": "namespace",
    "module": "namespace",
    "method_definition": "method",
    "abstract_method_signature": "method",
    "method_signature": "method",
}
_TS_BODIES = ("class_body", "interface_body", "object_type", "statement_block")


def _ts_head(node: Any, source: bytes) -> str:
    """The declaration up to its body: `export function f(a: number): string`."""
    body = node.child_by_field_name("body")
    end = body.start_byte if body is not None else node.end_byte
    head = source[node.start_byte : end].decode("utf-8", "replace")
    if body is None and node.type in (
        "type_alias_declaration",
        "lexical_declaration",
        "public_field_definition",
    ):
        head = head.split("\n", 1)[0]
    return _clip(head.rstrip(" {;"))


def _tree_sitter(grammar: str, text: str) -> list[Symbol] | None:
    parser = _ts_parser(grammar)
    if parser is None:
        return None
    source = text.encode("utf-8")
    tree = parser.parse(source)
    out: list[Symbol] = []

    def name_of(node: Any) -> str:
        n = node.child_by_field_name("name")
        return n.text.decode("utf-8", "replace") if n is not None else "?"

    def visit(node: Any, depth: int, exported: Any | None = None) -> None:
        outer = exported or node
        start, end = outer.start_point[0] + 1, outer.end_point[0] + 1
        kind = _TS_KINDS.get(node.type)
        if node.type == "export_statement":
            decl = node.child_by_field_name("declaration")
            if decl is not None:
                visit(decl, depth, node)
            return
        if kind is not None:
            head = _ts_head(node, source)
            if exported is not None and not head.startswith("export"):
                head = _clip("export " + head)
            out.append(Symbol(kind, name_of(node), start, end, head, depth))
            body = node.child_by_field_name("body")
            if kind in ("class", "namespace", "interface") and body is not None:
                for child in body.named_children:
                    visit(child, depth + 1)
            return
        if node.type in ("lexical_declaration", "variable_declaration") and depth == 0:
            for d in node.named_children:
                if d.type != "variable_declarator":
                    continue
                value = d.child_by_field_name("value")
                is_fn = value is not None and value.type in (
                    "arrow_function",
                    "function_expression",
                    "function",
                )
                if is_fn:
                    sig = source[outer.start_byte : (value.child_by_field_name("body") or value).start_byte]
                    head = _clip(sig.decode("utf-8", "replace").rstrip(" =>{"))
                    out.append(Symbol("function", name_of(d), start, end, head, depth))
                else:
                    name = name_of(d)
                    out.append(
                        Symbol("constant", name, start, end, _clip(f"{_ts_head(outer, source)}"), depth)
                    )
            return
        if node.type == "public_field_definition" and depth > 0:
            out.append(Symbol("field", name_of(node), start, end, _ts_head(node, source), depth))

    for child in tree.root_node.named_children:
        if child.type == "expression_statement" and child.named_children:  # `namespace X {}`
            child = child.named_children[0]
        visit(child, 0)
    return out


# --- plain text ------------------------------------------------------------------------------

_DEFINITION = re.compile(
    r"^\s*(?:export\s+|pub(?:\([^)]*\))?\s+|public\s+|private\s+|static\s+|async\s+)*"
    r"(?:def|class|fn|func|function|interface|struct|enum|trait|impl|module|package|type|[A-Z_][A-Z0-9_]*\s*[:=])\b"
)


def _plain(text: str) -> list[Symbol]:
    """Definition-like lines; for prose, the first line of each paragraph."""
    lines = text.splitlines()
    out = [
        Symbol("definition", line.strip()[:40], i, i, _clip(line), 0)
        for i, line in enumerate(lines, 1)
        if _DEFINITION.match(line)
    ]
    if not out:
        starts = [
            i for i, line in enumerate(lines, 1) if line.strip() and (i == 1 or not lines[i - 2].strip())
        ]
        for n, start in enumerate(starts):
            end = (starts[n + 1] - 2) if n + 1 < len(starts) else len(lines)
            out.append(Symbol("paragraph", lines[start - 1].strip()[:40], start, max(start, end),
                              _clip(lines[start - 1]), 0))  # fmt: skip
    if len(out) > PLAIN_MAX_ENTRIES:
        step = len(out) / PLAIN_MAX_ENTRIES
        out = [out[int(k * step)] for k in range(PLAIN_MAX_ENTRIES)]
    return out
