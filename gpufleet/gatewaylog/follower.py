"""Follow a log file by its path, like `tail -F`, by polling: whole new lines, across rotations.

Why polling and these rules (docs/gateway-exporter.md, "Rotation"):

* **Start at the end.** The exporter's counters start at 0 when it starts; Prometheus' `rate()`
  handles the reset. Counting the lines already in the file would count old requests as new ones
  on every restart. The start is the end of the last *whole* line, so a line nginx is writing at
  that moment is read whole once its newline arrives.
* **Whole lines only.** A read can end in the middle of a line; the unfinished part is kept until
  its newline arrives. A line longer than `max_line_bytes` is dropped (and counted), so a file
  without newlines cannot grow the buffer without bound.
* **Rename rotation** (logrotate's default: the file is renamed, a new one created, nginx told to
  reopen with SIGUSR1). The path then names another inode: the new file is read from its start,
  and the old one is kept open and read on until it has been quiet for `drain_s`, because nginx
  writes to it until it has reopened its logs. While the path is missing, the open file is read
  on (nginx is still writing to it).
* **Truncation** (logrotate's copytruncate): the file is smaller than the position read so far, or
  the bytes just before that position are no longer the ones read there (it was truncated and has
  already grown past the old position). It is read again from its start.
* **A file that does not exist yet** (or cannot be read) is waited for; when it appears it is read
  from its start, since everything in it was written after the exporter started.

Polling (`os.stat` and `os.pread` a few times a second) needs no inotify, works the same on every
filesystem, and costs nothing measurable next to nginx's own writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("gpufleet.gatewaylog")

DEFAULT_MAX_LINE_BYTES = 1 << 20  # nginx's lines are ~600 bytes; a megabyte is not a log line
DEFAULT_DRAIN_S = 5.0
READ_CHUNK = 1 << 20
TAIL_CHECK_BYTES = 64  # bytes before the read position compared on every poll, to see a truncation
_ALIGN_WINDOW = 1 << 16  # how far back from the end the start looks for the last newline


@dataclass(eq=False)
class _OpenFile:
    """One open log file and how far it has been read."""

    fd: int
    identity: tuple[int, int]  # (st_dev, st_ino)
    pos: int = 0
    partial: bytes = b""  # the unfinished last line
    tail: bytes = b""  # the last bytes read before pos (up to TAIL_CHECK_BYTES)
    skipping: bool = False  # dropping bytes up to the next newline (the rest of a line not kept)
    last_data_at: float = field(default=0.0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class LogFollower:
    """Reads the complete lines appended to `path` since the last `poll`, across rotations.

    Not thread-safe: one thread polls. The counters (`rotations`, `truncations`, `discarded`) and
    `up` are plain attributes read after a poll.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        start_at_end: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        drain_s: float = DEFAULT_DRAIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.fspath(path)
        self.max_line_bytes = max_line_bytes
        self.drain_s = drain_s
        self.clock = clock
        self.up = False  # the path exists and was opened (or is the file already open)
        self.rotations = 0  # the path named a new file
        self.truncations = 0  # the open file was truncated
        self.discarded = 0  # unfinished or overlong lines dropped
        self.behind = False  # the last poll stopped at its byte budget: more is waiting
        self._start_at_end = start_at_end  # only for the first open: later files are new
        self._current: _OpenFile | None = None
        self._retired: list[_OpenFile] = []  # rotated away, read until quiet for drain_s
        self._problem = ""  # the last reason the path could not be opened, logged once

    # ---- the public surface -------------------------------------------------------------------

    def poll(self, max_bytes: int = 8 * READ_CHUNK) -> list[bytes]:
        """The complete lines (without newlines) written since the last poll, at most ~max_bytes of them."""
        lines: list[bytes] = []
        budget = [max_bytes]
        for old in list(self._retired):
            self._read(old, lines, budget)
            if self.clock() - old.last_data_at >= self.drain_s:
                self._retire_for_good(old)
        if self._current is None:
            self._open()
        else:
            self._check_path(lines, budget)
        if self._current is not None:
            self._read(self._current, lines, budget)
        self._start_at_end = False
        self.behind = budget[0] <= 0
        return lines

    def close(self) -> None:
        for old in self._retired:
            old.close()
        self._retired.clear()
        if self._current is not None:
            self._current.close()
            self._current = None
        self.up = False

    # ---- opening and rotation -----------------------------------------------------------------

    def _open(self) -> None:
        """Open the path: at the end of its last whole line on the very first poll, else at its start."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.up = False
            self._note_problem(f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a directory opens, and fails at every read
            os.close(fd)
            self.up = False
            self._note_problem("not a regular file")
            return
        opened = _OpenFile(fd, (st.st_dev, st.st_ino), last_data_at=self.clock())
        if self._start_at_end:
            self._align_to_end(opened, st.st_size)
        self._current = opened
        self.up = True
        if self._problem:
            log.info("access log %s can be read now: following it from its start", self.path)
        self._problem = ""
        log.debug("following %s from byte %d", self.path, opened.pos)

    def _align_to_end(self, opened: _OpenFile, size: int) -> None:
        """Position after the file's last newline: what follows it is a line still being written."""
        if size == 0:
            return
        start = max(0, size - _ALIGN_WINDOW)
        window = os.pread(opened.fd, size - start, start)
        newline = window.rfind(b"\n")
        if newline >= 0:
            opened.pos = start + newline + 1
        elif start > 0:  # no newline in the window: join at the next line
            opened.pos, opened.skipping = size, True
        opened.tail = window[: opened.pos - start][-TAIL_CHECK_BYTES:]

    def _check_path(self, lines: list[bytes], budget: list[int]) -> None:
        """Whether the path still names the open file; a new file there is a rotation."""
        assert self._current is not None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            # renamed away and not yet re-created: nginx writes to the open file until it reopens
            self.up = False
            self._note_problem(f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        if (st.st_dev, st.st_ino) == self._current.identity:
            self.up = True
            self._problem = ""
            return
        old = self._current
        self._read(old, lines, budget)  # finish what was written before the new file appeared
        old.last_data_at = self.clock()  # the quiet time before letting go starts now, not at its last line
        self._retired.append(old)
        self._current = None
        self.rotations += 1
        log.info("access log %s was rotated: reading the new file from its start", self.path)
        self._open()

    def _retire_for_good(self, old: _OpenFile) -> None:
        if old.partial:
            self.discarded += 1  # an unfinished last line will not be finished now
        old.close()
        self._retired.remove(old)

    def _note_problem(self, problem: str) -> None:
        if problem != self._problem:
            log.warning("access log %s: %s; waiting for it", self.path, problem)
            self._problem = problem

    # ---- reading ------------------------------------------------------------------------------

    def _truncated(self, opened: _OpenFile) -> bool:
        """The file is shorter than what was read, or no longer holds the bytes read before pos."""
        size = os.fstat(opened.fd).st_size
        if size < opened.pos:
            return True
        if not opened.tail:
            return False
        return os.pread(opened.fd, len(opened.tail), opened.pos - len(opened.tail)) != opened.tail

    def _read(self, opened: _OpenFile, lines: list[bytes], budget: list[int]) -> None:
        """Read what the file holds past pos (up to the budget) and collect its whole lines."""
        try:
            if self._truncated(opened):
                if opened.partial:
                    self.discarded += 1
                opened.pos, opened.partial, opened.tail, opened.skipping = 0, b"", b"", False
                self.truncations += 1
                log.info("access log %s was truncated: reading it again from its start", self.path)
            while budget[0] > 0:
                chunk = os.pread(opened.fd, min(READ_CHUNK, budget[0]), opened.pos)
                if not chunk:
                    return
                opened.pos += len(chunk)
                budget[0] -= len(chunk)
                opened.last_data_at = self.clock()
                opened.tail = (opened.tail + chunk[-TAIL_CHECK_BYTES:])[-TAIL_CHECK_BYTES:]
                self._split(opened, chunk, lines)
        except OSError as exc:  # an I/O error on an open file: try again at the next poll
            log.warning("reading %s: %s", self.path, exc)

    def _split(self, opened: _OpenFile, chunk: bytes, lines: list[bytes]) -> None:
        data = opened.partial + chunk
        if opened.skipping:
            newline = data.find(b"\n")
            if newline < 0:
                opened.partial = b""
                return
            data = data[newline + 1 :]
            opened.skipping = False
        *whole, opened.partial = data.split(b"\n")
        lines.extend(whole)
        if len(opened.partial) > self.max_line_bytes:
            log.warning("dropping a line of more than %d bytes in %s", self.max_line_bytes, self.path)
            self.discarded += 1
            opened.partial, opened.skipping = b"", True
