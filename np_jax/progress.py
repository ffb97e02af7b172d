"""Progress of long work, as a person watching it needs it: a bar on a terminal (tqdm), and
without one (a pipe, a log file, CI) one line every `every_s` seconds through the caller's log.

A step that is one long XLA call (a jitted calibration pass) has no count to show: `Progress`
without a total still shows that it is alive, with the time spent, from a heartbeat thread.
Given no `log`, it shows nothing (library calls are silent unless asked).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

Log = Callable[[str], None]

EVERY_S = 10.0  # seconds between two progress lines without a terminal
TICK_S = 1.0  # the heartbeat: a bar's elapsed time advances at least this often


class Progress:
    """`with Progress("GPTQ", total=210, unit="matrix", log=log) as p: ... p.update()`."""

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "step", log: Log | None = None,
                 every_s: float = EVERY_S, tty: bool | None = None):
        self.desc, self.total, self.unit, self.log, self.every_s = desc, total, unit, log, every_s
        self.n = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._thread = None
        if log is None:
            return
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
        self._thread = threading.Thread(target=self._beat, name=f"progress: {desc}", daemon=True)
        self._thread.start()

    def line(self) -> str:
        units = {"matrix": "matrices", "entry": "entries"}.get(self.unit, self.unit + "s")
        done = f"{self.n}/{self.total} {units}" if self.total else (f"{self.n} {units}" if self.n else "")
        return f"{self.desc}: {done + ', ' if done else ''}{time.monotonic() - self.t0:.0f} s"

    def _beat(self) -> None:
        while not self._stop.wait(min(TICK_S, self.every_s)):
            if self._bar is not None:
                self._bar.refresh()
            elif time.monotonic() - self._last >= self.every_s:
                self._last = time.monotonic()
                self.log(self.line())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
