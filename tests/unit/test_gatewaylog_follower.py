"""The log follower on real files: appends, unfinished lines, rename and copytruncate rotation, a late file.

The files are written the way nginx writes its access log (opened O_APPEND, one write per line); a
settable clock stands in for the time the rotated file is drained.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpufleet.gatewaylog.follower import LogFollower

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Writer:
    """A file opened for appending, as nginx opens its logs; it stays open across a rename."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def lines(self, *lines: bytes) -> None:
        for line in lines:
            self.write(line + b"\n")

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


def follower(path: Path, clock: Clock | None = None, **kwargs: object) -> LogFollower:
    return LogFollower(path, clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]


def test_starts_at_the_end_and_reads_only_new_lines(log: Path) -> None:
    writer = Writer(log)
    writer.lines(b"old 1", b"old 2")
    f = follower(log)
    assert f.poll() == [] and f.up
    writer.lines(b"new 1", b"new 2")
    assert f.poll() == [b"new 1", b"new 2"]
    assert f.poll() == []
    writer.lines(b"new 3")
    assert f.poll() == [b"new 3"]
    assert (f.rotations, f.truncations, f.discarded) == (0, 0, 0)


def test_an_unfinished_line_waits_for_its_newline(log: Path) -> None:
    writer = Writer(log)
    f = follower(log)
    f.poll()
    writer.write(b'{"status":2')
    assert f.poll() == []
    writer.write(b"00}")
    assert f.poll() == []
    writer.write(b'\n{"status":201}\n{"sta')
    assert f.poll() == [b'{"status":200}', b'{"status":201}']
    writer.write(b'tus":202}\n')
    assert f.poll() == [b'{"status":202}']


def test_a_line_being_written_at_the_start_is_read_whole(log: Path) -> None:
    writer = Writer(log)
    writer.lines(b"before the start")
    writer.write(b"half of a li")
    f = follower(log)
    assert f.poll() == []
    writer.write(b"ne\n")
    assert f.poll() == [b"half of a line"]


def test_an_empty_or_newline_less_file_at_the_start(log: Path) -> None:
    writer = Writer(log)
    f = follower(log)
    assert f.poll() == []  # empty: start at 0
    writer.lines(b"first")
    assert f.poll() == [b"first"]

    other = log.with_name("other.log")
    Writer(other).write(b"x" * 200_000)  # no newline in the last 64 KiB: join at the next line
    g = follower(other)
    assert g.poll() == []
    Writer(other).write(b"tail of it\nnext\n")
    assert g.poll() == [b"next"]


def test_rename_rotation_reads_the_old_file_to_its_end_then_the_new_one_from_its_start(log: Path) -> None:
    clock = Clock()
    nginx = Writer(log)
    f = follower(log, clock, drain_s=5.0)
    f.poll()
    nginx.lines(b"a1")
    assert f.poll() == [b"a1"]

    log.rename(log.with_name("access.log.1"))  # logrotate: rename ...
    nginx.lines(b"a2")  # ... nginx still writes to the renamed file
    assert f.poll() == [b"a2"]
    assert not f.up  # the path names nothing for now

    new = Writer(log)  # ... logrotate's `create`
    new.lines(b"b1")
    nginx.lines(b"a3")  # before nginx has reopened its logs (SIGUSR1)
    assert sorted(f.poll()) == [b"a3", b"b1"]
    assert f.rotations == 1 and f.up

    clock.now += 1
    nginx.lines(b"a4")  # still the old file: nginx is slow to reopen
    new.lines(b"b2")
    assert sorted(f.poll()) == [b"a4", b"b2"]

    nginx.close()  # nginx reopened; the old file goes quiet and is let go after drain_s
    clock.now += 5
    assert f.poll() == []
    assert f._retired == []
    new.lines(b"b3")
    assert f.poll() == [b"b3"]
    assert (f.rotations, f.truncations, f.discarded) == (1, 0, 0)


def test_a_quiet_log_rotated_is_still_read_until_nginx_reopens(log: Path) -> None:
    """The drain time counts from the rotation: a log quiet for an hour before it is not let go at once."""
    clock = Clock()
    nginx = Writer(log)
    f = follower(log, clock, drain_s=5.0)
    f.poll()
    clock.now += 3600
    log.rename(log.with_name("access.log.1"))
    Writer(log)
    assert f.poll() == [] and f.rotations == 1
    clock.now += 4
    assert f.poll() == []
    nginx.lines(b"late")  # nginx has not reopened yet
    assert f.poll() == [b"late"]


def test_an_unfinished_line_in_a_rotated_file_is_dropped_and_counted(log: Path) -> None:
    clock = Clock()
    nginx = Writer(log)
    f = follower(log, clock, drain_s=1.0)
    f.poll()
    nginx.write(b"cut sho")
    log.rename(log.with_name("access.log.1"))
    Writer(log).lines(b"new")
    assert f.poll() == [b"new"]
    clock.now += 2
    assert f.poll() == []
    assert f.discarded == 1


def test_copytruncate_is_read_again_from_the_start(log: Path) -> None:
    nginx = Writer(log)
    f = follower(log)
    f.poll()
    nginx.lines(b"line one is long", b"line two is long")
    assert len(f.poll()) == 2
    os.truncate(log, 0)  # logrotate copytruncate; nginx (O_APPEND) goes on at the new end
    nginx.lines(b"short")
    assert f.poll() == [b"short"]
    assert f.truncations == 1 and f.rotations == 0


def test_a_truncated_file_that_grew_past_the_old_position_is_noticed(log: Path) -> None:
    nginx = Writer(log)
    f = follower(log)
    f.poll()
    nginx.lines(b"A" * 50)
    assert f.poll() == [b"A" * 50]
    os.truncate(log, 0)
    nginx.lines(b"B" * 40, b"C" * 40)  # longer than what was read: the size alone does not tell
    assert f.poll() == [b"B" * 40, b"C" * 40]
    assert f.truncations == 1


def test_a_file_that_appears_later_is_read_from_its_start(log: Path) -> None:
    f = follower(log)
    assert f.poll() == [] and not f.up
    assert f.poll() == []
    Writer(log).lines(b"first", b"second")
    assert f.poll() == [b"first", b"second"] and f.up
    assert f.rotations == 0


def test_a_path_that_is_not_a_file_is_down_not_fatal(log: Path) -> None:
    log.mkdir()
    f = follower(log)
    assert f.poll() == [] and not f.up
    log.rmdir()
    Writer(log).lines(b"now a file")
    assert f.poll() == [b"now a file"] and f.up


def test_an_overlong_line_is_dropped_and_the_next_one_read(log: Path) -> None:
    nginx = Writer(log)
    f = follower(log, max_line_bytes=100)
    f.poll()
    nginx.write(b"x" * 150)
    assert f.poll() == []
    nginx.write(b"y" * 150 + b"\nfine\n")
    assert f.poll() == [b"fine"]
    assert f.discarded == 1


def test_a_poll_reads_at_most_its_budget_and_says_it_is_behind(log: Path) -> None:
    nginx = Writer(log)
    f = follower(log)
    f.poll()
    lines = [b"%04d" % i + b"." * 95 for i in range(100)]  # 100 bytes each with the newline
    nginx.lines(*lines)
    first = f.poll(max_bytes=1000)
    assert first == lines[:10] and f.behind
    rest = f.poll()
    assert first + rest == lines and not f.behind


def test_close_lets_go_of_every_file(log: Path) -> None:
    nginx = Writer(log)
    f = follower(log)
    f.poll()
    log.rename(log.with_name("access.log.1"))
    Writer(log)
    nginx.lines(b"x")
    f.poll()
    f.close()
    assert f._current is None and f._retired == [] and not f.up
