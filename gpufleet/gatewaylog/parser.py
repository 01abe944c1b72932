"""One access-log line (nginx's `gpufleet_json` format) into an `AccessRecord`, or `MalformedLine`.

The format is roles/gateway/templates/gpufleet.conf.j2's. What nginx actually writes there, and
what this parser is built around:

* `status` is an unquoted number. nginx prints it with `%03ui`, so a request it never gave a status
  is logged as `"status":000`, which strict JSON refuses (leading zeros); the status is therefore
  quoted before decoding and kept as the text nginx wrote ("200", "429", "000").
* `escape=json` escapes quotes and control characters but passes other bytes through, and `$uri`
  is percent-decoded: `/v1/x%ff` is logged with a raw 0xff byte. Lines are decoded as UTF-8 with
  replacement, so such a request still counts.
* The `upstream_*` fields are strings. One value per engine nginx tried, separated by `", "`
  (`"502, 200"` when the first instance refused and the second answered), and by `" : "` after an
  internal redirect to another upstream group; `"-"` where a value was never received (no
  connection, no headers); `""` when no engine was involved (401, 429, 404).
* When no instance was left to try, nginx logs the upstream group's *name* as the address
  (`"127.0.0.1:8001, gpufleet_engines"`, status `"502, 502"`): that entry is not an engine that
  was tried, so it does not count as an attempt.
* A request line nginx could not parse is logged with `method` and `uri` empty and status 400.

Anything else (not JSON, not an object, no status, a negative or non-numeric `request_time`) is a
malformed line: counted by the caller, never fatal.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

NO_CLIENT = "-"  # the client label of requests without a known API key (the log has "")

_STATUS = re.compile(r'([{,]"status":)(\d+)')  # the first key "status" of the object, unquoted
_SEPARATORS = re.compile(r"\s*,\s*|\s+:\s+")
_STATUS_TEXT = re.compile(r"\d{3}")


class MalformedLine(ValueError):
    """A line that is not a gateway access record; the message says why."""


@dataclass(frozen=True)
class AccessRecord:
    """The fields of one request the metrics need."""

    status: str  # as nginx wrote it: "200", "429", "502"
    client: str  # the API key's client name, NO_CLIENT when there was none
    request_time: float  # seconds
    upstream_addrs: tuple[str, ...] = ()  # one per upstream entry, in order
    upstream_statuses: tuple[str, ...] = ()
    upstream_header_time: float | None = None  # the last entry's; None when absent or "-"
    request_id: str = ""
    time: str = ""

    @property
    def attempts(self) -> int:
        """Engine instances nginx sent the request to (an upstream group's name is not one)."""
        return sum(1 for addr in self.upstream_addrs if _is_server(addr))

    @property
    def retried(self) -> bool:
        return self.attempts > 1


def _is_server(addr: str) -> bool:
    # 127.0.0.1:8000, [::1]:8000 and unix:/path all have a colon; a group name ("gpufleet_engines") has none
    return ":" in addr


def split_upstream(value: str) -> tuple[str, ...]:
    """'0.001, 0.002' -> ('0.001', '0.002'); '' -> (); ' : ' separates values of two upstream groups."""
    value = value.strip()
    if not value:
        return ()
    return tuple(_SEPARATORS.split(value))


def _seconds(value: str, field: str) -> float | None:
    """A time from an upstream field: None for "-" (never received), MalformedLine for non-numbers."""
    if value in ("", "-"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise MalformedLine(f"{field}: {value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise MalformedLine(f"{field}: {value!r} is not a number of seconds")
    return seconds


def _text(record: dict[str, object], field: str) -> str:
    value = record.get(field, "")
    if not isinstance(value, str):
        raise MalformedLine(f"{field}: expected a string, got {value!r}")
    return value


def parse_line(line: bytes | str) -> AccessRecord:
    """The record of one access-log line (without its newline); MalformedLine when it is not one."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    found = _STATUS.search(text)
    if found:
        text = f'{text[: found.start(2)]}"{found[2]}"{text[found.end(2) :]}'
    try:
        record = json.loads(text)
    except ValueError as exc:  # JSONDecodeError
        raise MalformedLine(f"not JSON: {exc}") from None
    except RecursionError:
        raise MalformedLine("not JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise MalformedLine(f"not a JSON object: {type(record).__name__}")

    status = record.get("status")
    if isinstance(status, int) and not isinstance(status, bool):  # written in some other way than ours
        status = f"{status:03d}"
    if not isinstance(status, str) or not _STATUS_TEXT.fullmatch(status):
        raise MalformedLine(f"status: expected a 3-digit HTTP status, got {status!r}")

    request_time = record.get("request_time")
    if isinstance(request_time, bool) or not isinstance(request_time, (int, float)):
        raise MalformedLine(f"request_time: expected a number of seconds, got {request_time!r}")
    if not (math.isfinite(request_time) and request_time >= 0):
        raise MalformedLine(f"request_time: {request_time!r} is not a duration")

    header_times = split_upstream(_text(record, "upstream_header_time"))
    return AccessRecord(
        status=status,
        client=_text(record, "client") or NO_CLIENT,
        request_time=float(request_time),
        upstream_addrs=split_upstream(_text(record, "upstream")),
        upstream_statuses=split_upstream(_text(record, "upstream_status")),
        upstream_header_time=_seconds(header_times[-1], "upstream_header_time") if header_times else None,
        request_id=_text(record, "request_id"),
        time=_text(record, "time"),
    )
