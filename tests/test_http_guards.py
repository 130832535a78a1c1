"""
The HTTP guards in-process, without a server: the JSON shape scan, the Host/Origin/Content-Type checks and
the page's Content-Security-Policy hashes. tests/test_chat_web.py tries each against the real server.
"""
import base64
import hashlib
import json
import time

import pytest

from nanochat.http_guards import (RequestError, allowed_hosts, check_json_shape, cross_site_problem, hostname,
                                  inline_hashes, parse_origins)


def shape_error(raw, max_depth=16, max_values=20_000):
    try:
        check_json_shape(raw, max_depth, max_values)
    except RequestError as e:
        return e.code
    return None


def test_json_values_and_depth_are_counted_outside_strings():
    assert shape_error(b'{"messages": [' + b"[]," * 10_000 + b"[]]}") == "json_too_many_values"
    assert shape_error(b"[" + b"1," * 20_000 + b"1]") == "json_too_many_values"
    assert shape_error(b"[" + b'"",' * 10_000 + b'""]') is None and shape_error(b'"",' * 20_001) == "json_too_many_values"
    assert shape_error(b'["' + b"[]," * 300_000 + b'"]') is None  # one string, however it looks inside
    assert shape_error(b'["\\\\"' + b",[]" * 20_000 + b"]") == "json_too_many_values"  # "\\" is a whole string...
    assert shape_error(b'["\\"' + b",[]" * 20_000 + b'"]') is None  # ...and "\"... is not: an escaped quote ends none
    assert shape_error(b"[" * 17 + b"]" * 17) == "json_too_deep" and shape_error(b"[" * 16 + b"]" * 16) is None
    assert shape_error(b'[{"a": [{"b": "[[[[[[[[[[[[[[[[[["}]}]') is None
    assert shape_error(b"{not json") is None  # json.loads says what is wrong with it


def test_a_chat_request_is_well_within_the_json_limits():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}] * 500  # MAX_MESSAGES, 4 parts each
    raw = json.dumps({"messages": parts, "stop": ["[", "]", ","], "temperature": 0.5}).encode()
    assert shape_error(raw, max_values=11_000) is None and shape_error(raw, max_values=9_000) == "json_too_many_values"


def test_the_json_scan_is_fast_on_the_worst_megabyte():
    for raw in [b"[]," * 333_000, b"]" * 1_000_000, b'"' * 1_000_000, b'\\"' * 400_000, b'"\\' * 400_000]:
        started = time.perf_counter()
        shape_error(raw)
        assert time.perf_counter() - started < 0.05, raw[:10]  # ~2-8 ms; the walk or split of these took 30-50 ms


def test_host_names_and_the_hosts_a_server_answers_to():
    assert [hostname(h) for h in ["localhost:8000", "LOCALHOST", "[::1]:80", "[::1]", "127.0.0.1:1", "", "[::1"]] == \
        ["localhost", "localhost", "[::1]", "[::1]", "127.0.0.1", "", ""]
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_hosts("127.0.0.2") == {"localhost", "127.0.0.1", "[::1]", "127.0.0.2"}
    assert allowed_hosts("::1") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_hosts("0.0.0.0") is None  # open to a network: any name, unless listed
    assert allowed_hosts("0.0.0.0", "chat.example:443, Other.Example") == {"chat.example", "other.example"}
    assert parse_origins(" http://a.example:3000/ ,* ") == {"http://a.example:3000", "*"} and parse_origins(None) == set()


@pytest.mark.parametrize("method, headers, origins, expected", [
    ("POST", {"host": "localhost:8000", "content-type": "application/json"}, set(), None),
    ("POST", {"host": "localhost:8000", "content-type": "application/json; charset=utf-8", "origin": "http://localhost:8000"}, set(), None),
    ("POST", {"host": "localhost:8000", "content-type": "text/plain"}, set(), "unsupported_media_type"),
    ("POST", {"host": "localhost:8000"}, set(), "unsupported_media_type"),
    ("GET", {"host": "localhost:8000"}, set(), None),
    ("GET", {"host": "evil.example:8000"}, set(), "host_not_allowed"),
    ("GET", {}, set(), "host_not_allowed"),
    ("GET", {"host": "localhost:8000", "origin": "http://evil.example"}, set(), "origin_not_allowed"),
    ("GET", {"host": "localhost:8000", "origin": "https://localhost:8000"}, set(), "origin_not_allowed"),
    ("GET", {"host": "localhost:8000", "origin": "http://evil.example"}, {"http://evil.example"}, None),
    ("GET", {"host": "localhost:8000", "origin": "null"}, {"*"}, None),
])
def test_cross_site_problems(method, headers, origins, expected):
    raw = {name.encode(): value.encode() for name, value in headers.items()}
    error = cross_site_problem("http", method, raw, allowed_hosts("127.0.0.1"), origins)
    assert (error and error.code) == expected


def test_the_csp_hashes_are_those_of_the_inline_texts():
    html = "<style>b { }</style><script>\r\nrun()\r\n</script><script type=module>x</script>"
    digest = lambda text: "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
    assert inline_hashes(html, "style") == digest("b { }")
    assert inline_hashes(html, "script") == f"{digest(chr(10) + 'run()' + chr(10))} {digest('x')}"  # CR LF read as LF
    assert inline_hashes("<p>no script</p>", "script") == "'none'"
