"""How clients re-send earlier turns: the 8 echo styles the context tests and bench use.

Each style takes (role, text) of one stored turn and returns it as such a client pastes it.
"""

from __future__ import annotations

from typing import Any

ECHO_STYLES: dict[str, Any] = {
    "verbatim": lambda role, text: text,
    "quoted": lambda role, text: "\n".join("> " + line for line in text.split("\n")),
    "role_labels": lambda role, text: f"{role.capitalize()}: {text}",
    "xml_tags": lambda role, text: f'<message role="{role}">\n{text}\n</message>',
    "md_headings": lambda role, text: f"### {role.capitalize()}\n\n{text}",
    "ellipsis": lambda role, text: (text[:400] + "...") if len(text) > 400 else text,
    "reindented": lambda role, text: "\n".join("    " + line for line in text.split("\n")),
    "whitespace": lambda role, text: "  ".join(text.replace("\n", "\r\n").split(" ")) + "\r\n",
}
"""How clients re-send earlier turns: each takes (role, text) and returns the echoed text."""


def echo(turns: list[dict[str, str]], style: str) -> str:
    """The whole history as an echoing client pastes it in front of its new prompt."""
    fmt = ECHO_STYLES[style]
    return "\n\n".join(fmt(t["role"], t["content"]) for t in turns)
