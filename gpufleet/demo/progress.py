"""The demo's progress display: where the run is, how long each step took, what it is doing now.

On a terminal the running step's line is redrawn in place once a second (its clock moves even
while a command prints nothing, so a slow step never looks hung). Anywhere else (a CI log, `make
demo | tee`) every step gets a start line and an end line, plus a heartbeat line with the latest
detail every HEARTBEAT_S seconds, so a log stays short and still shows progress.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

HEARTBEAT_S = 30.0
REDRAW_S = 1.0


def clock(seconds: float) -> str:
    """m:ss (h:mm:ss past an hour)."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A numbered list of steps, one running at a time."""

    def __init__(self, titles: list[str], stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.titles = titles
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.index: int | None = None
        self.started = 0.0
        self.run_started = time.monotonic()
        self.text = ""
        self.last_heartbeat = 0.0
        self.lock = threading.Lock()
        self.stop_ticker = threading.Event()
        self.ticker: threading.Thread | None = None

    def _label(self, index: int) -> str:
        return f"[{index + 1}/{len(self.titles)}] {self.titles[index]}"

    def _write_line(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()

    def _redraw(self) -> None:
        if self.index is None:
            return
        line = f"{self._label(self.index)}  {clock(time.monotonic() - self.started)}"
        if self.text:
            line += f"  · {self.text}"
        width = shutil.get_terminal_size((100, 24)).columns - 1
        self.stream.write("\r\033[K" + line[:width])
        self.stream.flush()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self.index is not None and now - self.last_heartbeat >= HEARTBEAT_S:
            self.last_heartbeat = now
            line = f"{self._label(self.index)}  {clock(now - self.started)}"
            self._write_line(line + (f"  · {self.text}" if self.text else ""))

    def _tick(self) -> None:
        while not self.stop_ticker.wait(REDRAW_S):
            with self.lock:
                if self.tty:
                    self._redraw()
                else:
                    self._heartbeat()

    def start(self, index: int) -> None:
        with self.lock:
            self.index, self.started, self.text = index, time.monotonic(), ""
            self.last_heartbeat = self.started
            if self.tty:
                self._redraw()
            else:
                self._write_line(f"{self._label(index)} ...")
        if self.ticker is None:
            self.ticker = threading.Thread(target=self._tick, name="demo-progress", daemon=True)
            self.ticker.start()

    def detail(self, text: str) -> None:
        """What the running step is doing now (the latest line worth showing)."""
        with self.lock:
            self.text = " ".join(text.split())
            if self.tty:
                self._redraw()

    def finish(self, ok: bool, note: str = "") -> float:
        """End the running step; its duration in seconds."""
        with self.lock:
            assert self.index is not None, "finish() without start()"
            took = time.monotonic() - self.started
            result = "done" if ok else "FAILED"
            self._write_line(f"{self._label(self.index)}  {result} in {clock(took)}" + (f"  · {note}" if note else ""))
            self.index = None
            return took

    def close(self) -> float:
        """Stop redrawing; the whole run's duration in seconds."""
        self.stop_ticker.set()
        if self.ticker is not None:
            self.ticker.join(timeout=2)
        return time.monotonic() - self.run_started
