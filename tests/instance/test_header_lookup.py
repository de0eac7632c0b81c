"""instance.runtime.header: the router's headers are found whatever case the transport gave."""

from __future__ import annotations

from starlette.datastructures import Headers

from common.protocol import CLIENT_HEADER, PRINCIPAL_HEADER, SESSION_HEADER
from instance.runtime import header


def test_header_finds_names_in_a_lowercase_dict_and_in_starlette_headers() -> None:
    plain = {"x-exai-session": "s-1", "x-exai-principal": "alice"}  # as headers_of hands them out
    assert header(plain, SESSION_HEADER) == "s-1"
    assert header(plain, PRINCIPAL_HEADER) == "alice"
    assert header(plain, CLIENT_HEADER) is None
    starlette = Headers(raw=[(b"x-exai-session", b"s-2")])
    assert header(starlette, SESSION_HEADER) == "s-2"
    assert header({SESSION_HEADER: "s-3"}, SESSION_HEADER) == "s-3"  # a dict spelled as sent
    assert header({"x-exai-session": ""}, SESSION_HEADER) == ""  # empty is a value, not absent
