"""A sweep's progress on stderr: trials done / running / left, the throughput and the ETA.

``ETA = left * elapsed / finished``, with ``finished`` the trials completed since this process
started (by any worker on any machine sharing the study), so it reflects the real parallelism.
One line per update when stderr is not a terminal, an updating line when it is.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SweepProgress:
    """Call :meth:`update` with the counts whenever they change, :meth:`close` at the end."""

    def __init__(self, title: str, total: int, *, enabled: bool = True):
        self.title, self.total, self.enabled = title, total, enabled
        self.start = time.perf_counter()
        self.first_done: int | None = None
        self.last: tuple = ()
        self.tty = sys.stderr.isatty()

    def line(self, done: int, running: int) -> str:
        """``title: D done, R running, L left, ETA ...`` for ``done`` of :attr:`total`."""
        if self.first_done is None:
            self.first_done = done
        left = self.total - done
        elapsed = time.perf_counter() - self.start
        finished = done - self.first_done
        eta = f"ETA {_duration(left * elapsed / finished)}" if finished and left else "ETA ?" if left else "ETA 0s"
        return f"{self.title}: {done} done, {running} running, {left - running} left of {self.total}, " \
               f"{_duration(elapsed)} elapsed, {eta}"

    def update(self, done: int, running: int, note: str = "") -> None:
        """Show the counts; without a terminal only when they (or ``note``) changed."""
        text = self.line(done, running) + (f"  {note}" if note else "")
        state = (done, running, note) if not self.tty else (text,)
        if not self.enabled or state == self.last:
            return
        self.last = state
        sys.stderr.write(("\r" + text + " " * 8) if self.tty else text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + f"{self.title}: {self.total} trials done in "
                             f"{_duration(time.perf_counter() - self.start)}" + " " * 30 + "\n")
            sys.stderr.flush()
