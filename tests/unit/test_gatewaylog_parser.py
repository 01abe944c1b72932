"""The access-log parser against lines as nginx 1.22 wrote them in the `gpufleet_json` format.

Every LINE_* below was copied from a real gateway's access log (tests/integration/gateway_harness.py's
nginx over two simulators), not written by hand.
"""

from __future__ import annotations

import json

import pytest

from gpufleet.gatewaylog.parser import NO_CLIENT, AccessRecord, MalformedLine, parse_line, split_upstream

pytestmark = pytest.mark.unit

LINE_200 = (
    b'{"time":"2026-11-22T07:28:16+00:00","request_id":"9bb2a01ee8c217ce1a0a6d3a8e5af1e7","client":"team-a",'
    b'"remote_addr":"127.0.0.1","method":"POST","uri":"/v1/chat/completions","status":200,"request_length":381,'
    b'"bytes_sent":788,"request_time":0.031,"upstream":"127.0.0.1:45859","upstream_status":"200",'
    b'"upstream_connect_time":"0.002","upstream_header_time":"0.029","upstream_response_time":"0.029",'
    b'"limit_req":"PASSED","limit_conn":"PASSED"}'
)
LINE_401 = (
    b'{"time":"2026-11-22T07:28:16+00:00","request_id":"5e00205e568ba7fd263ca2049583770d","client":"",'
    b'"remote_addr":"127.0.0.1","method":"POST","uri":"/v1/chat/completions","status":401,"request_length":160,'
    b'"bytes_sent":383,"request_time":0.006,"upstream":"","upstream_status":"","upstream_connect_time":"",'
    b'"upstream_header_time":"","upstream_response_time":"","limit_req":"","limit_conn":""}'
)
LINE_429 = (
    b'{"time":"2026-11-22T07:31:03+00:00","request_id":"77b1cc6296c323b4ed69183242d48973","client":"team-a",'
    b'"remote_addr":"127.0.0.1","method":"POST","uri":"/v1/chat/completions","status":429,"request_length":206,'
    b'"bytes_sent":422,"request_time":0.000,"upstream":"","upstream_status":"","upstream_connect_time":"",'
    b'"upstream_header_time":"","upstream_response_time":"","limit_req":"REJECTED","limit_conn":""}'
)
# the first instance was dead (connection refused), the second answered: a retry
LINE_RETRIED = (
    b'{"time":"2026-11-22T07:28:16+00:00","request_id":"8ccbc68b44df6cf36e3eaaea79651511","client":"team-a",'
    b'"remote_addr":"127.0.0.1","method":"POST","uri":"/v1/chat/completions","status":200,"request_length":381,'
    b'"bytes_sent":790,"request_time":0.030,"upstream":"127.0.0.1:45859, 127.0.0.1:59825",'
    b'"upstream_status":"502, 200","upstream_connect_time":"-, 0.000","upstream_header_time":"-, 0.030",'
    b'"upstream_response_time":"0.000, 0.030","limit_req":"PASSED","limit_conn":"PASSED"}'
)
# one instance tried, then none left: nginx logs the upstream group's name as a second "address"
LINE_NO_LIVE_UPSTREAM = (
    b'{"time":"2026-11-22T07:28:16+00:00","request_id":"f7998456967eb2b948b4a33c0778c727","client":"team-a",'
    b'"remote_addr":"127.0.0.1","method":"POST","uri":"/v1/chat/completions","status":502,"request_length":381,'
    b'"bytes_sent":307,"request_time":0.001,"upstream":"127.0.0.1:59825, gpufleet_engines",'
    b'"upstream_status":"502, 502","upstream_connect_time":"-, -","upstream_header_time":"-, -",'
    b'"upstream_response_time":"0.000, 0.000","limit_req":"PASSED","limit_conn":"PASSED"}'
)
# `/v1/models%ff%0a%22x`: $uri is percent-decoded, escape=json escapes \n and " but passes the 0xff byte
LINE_RAW_BYTE = (
    b'{"time":"2026-11-22T07:28:16+00:00","request_id":"6795acdc65559e6936978d8899d359c7","client":"team-a",'
    b'"remote_addr":"127.0.0.1","method":"GET","uri":"/v1/models\xff\\n\\"x","status":404,"request_length":152,'
    b'"bytes_sent":300,"request_time":0.000,"upstream":"","upstream_status":"","upstream_connect_time":"",'
    b'"upstream_header_time":"","upstream_response_time":"","limit_req":"","limit_conn":""}'
)
# a request line nginx could not parse ("GARBAGE")
LINE_BAD_REQUEST = (
    b'{"time":"2026-11-22T07:28:16+00:00","request_id":"f4d1dfc916d4b1c5605f2518476bed68","client":"",'
    b'"remote_addr":"127.0.0.1","method":"","uri":"","status":400,"request_length":0,"bytes_sent":310,'
    b'"request_time":0.000,"upstream":"","upstream_status":"","upstream_connect_time":"","upstream_header_time":"",'
    b'"upstream_response_time":"","limit_req":"","limit_conn":""}'
)


def test_a_served_request() -> None:
    record = parse_line(LINE_200)
    assert record == AccessRecord(
        status="200", client="team-a", request_time=0.031, upstream_addrs=("127.0.0.1:45859",),
        upstream_statuses=("200",), upstream_header_time=0.029, request_id="9bb2a01ee8c217ce1a0a6d3a8e5af1e7",
        time="2026-11-22T07:28:16+00:00",
    )
    assert record.attempts == 1 and not record.retried


def test_requests_refused_by_the_gateway_never_reached_an_engine() -> None:
    unauthorised, limited = parse_line(LINE_401), parse_line(LINE_429)
    assert (unauthorised.status, unauthorised.client) == ("401", NO_CLIENT)
    assert (limited.status, limited.client) == ("429", "team-a")
    for record in (unauthorised, limited):
        assert record.upstream_addrs == () and record.upstream_header_time is None and record.attempts == 0
    assert limited.request_time == 0.0


def test_a_retry_is_two_engines_and_the_header_time_is_the_last_ones() -> None:
    record = parse_line(LINE_RETRIED)
    assert record.upstream_statuses == ("502", "200")
    assert record.upstream_header_time == 0.030
    assert record.attempts == 2 and record.retried


def test_the_upstream_group_name_is_not_an_attempt() -> None:
    record = parse_line(LINE_NO_LIVE_UPSTREAM)
    assert record.status == "502"
    assert record.upstream_addrs == ("127.0.0.1:59825", "gpufleet_engines")
    assert record.attempts == 1 and not record.retried
    assert record.upstream_header_time is None  # "-, -": no headers from anyone


def test_raw_bytes_in_the_uri_and_unparseable_requests_still_count() -> None:
    assert parse_line(LINE_RAW_BYTE).status == "404"
    bad = parse_line(LINE_BAD_REQUEST)
    assert (bad.status, bad.client) == ("400", NO_CLIENT)


def test_status_is_kept_as_nginx_wrote_it_even_000() -> None:
    """nginx prints $status with %03ui: a request without a status is `"status":000`, not valid JSON."""
    record = parse_line(LINE_401.replace(b'"status":401', b'"status":000'))
    assert record.status == "000"
    assert parse_line(LINE_200.decode()).status == "200"  # str lines too


def test_upstream_lists() -> None:
    assert split_upstream("") == ()
    assert split_upstream("0.001") == ("0.001",)
    assert split_upstream("0.001, 0.002") == ("0.001", "0.002")
    # after an internal redirect, another upstream group's values follow " : "
    assert split_upstream("127.0.0.1:8000, 127.0.0.1:8001 : [::1]:9000") == (
        "127.0.0.1:8000", "127.0.0.1:8001", "[::1]:9000")
    assert split_upstream("502, 502 : 200") == ("502", "502", "200")
    record = parse_line(LINE_RETRIED.replace(b'"upstream":"127.0.0.1:45859, 127.0.0.1:59825"',
                                             b'"upstream":"unix:/run/a.sock, [::1]:8001 : 127.0.0.1:8002"'))
    assert record.attempts == 3


def test_missing_upstream_fields_are_empty_not_malformed() -> None:
    minimal = parse_line(b'{"status":204,"request_time":1.5}')
    assert (minimal.status, minimal.client, minimal.request_time, minimal.attempts) == ("204", NO_CLIENT, 1.5, 0)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"garbage",
        b'{"status":200,"request_time":0.1',  # cut short
        LINE_200[: len(LINE_200) // 2],
        b"[1, 2]",
        b'"a string"',
        b'{"request_time":0.1}',  # no status
        b'{"status":"OK","request_time":0.1}',
        b'{"status":2000,"request_time":0.1}',
        b'{"status":true,"request_time":0.1}',
        b'{"status":200}',  # no request_time
        b'{"status":200,"request_time":"0.1"}',
        b'{"status":200,"request_time":-1}',
        b'{"status":200,"request_time":NaN}',
        b'{"status":200,"request_time":0.1,"upstream_header_time":"soon"}',
        b'{"status":200,"request_time":0.1,"upstream_header_time":"0.1, -0.5"}',
        b'{"status":200,"request_time":0.1,"client":7}',
        b"[" * 100_000,  # nested too deeply for the decoder
        b"\x00\xff\xfe",
    ],
)
def test_malformed_lines_raise_malformed_line_only(line: bytes) -> None:
    with pytest.raises(MalformedLine):
        parse_line(line)


def test_the_status_quoting_does_not_touch_strings() -> None:
    """A client can put `,"status":123` in its URI; escape=json makes it `,\\"status\\":123`, left alone."""
    uri = '/v1/x,"status":123'
    line = json.dumps({"uri": uri, "status": 201, "request_time": 0.2}, separators=(",", ":"))
    assert parse_line(line).status == "201"
    assert json.loads(line)["uri"] == uri
