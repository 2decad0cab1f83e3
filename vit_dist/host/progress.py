"""Progress of long work that is not training (the image check, `vit-dist eval`, and the steps of
merge-checkpoint and import-weights), on stderr of the main process.

On a terminal: one line rewritten in place (count/total, rate, ETA), ended when the work is done. In
a log (stderr not a terminal, e.g. a launcher's worker log): a plain line at each tenth of the work,
once the work has run for LOG_AFTER_S, and a last line if any was written; short work writes none,
and no work writes more than 11.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

REDRAW_S = 0.1  # a terminal line is redrawn at most this often
LOG_AFTER_S = 5.0  # work shorter than this writes nothing into a log
LOG_STEPS = 10  # log lines at each tenth of the work


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """`done` of `total` units of a piece of work called `what`; shown only if `show` (the main
    process). Use as a context manager, or iterate(); finish() ends the display."""

    def __init__(self, total: int, what: str, unit: str, show: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.unit = max(0, total), what, unit
        self.stream = stream or sys.stderr
        self.show = show and self.total > 0
        self.terminal = self.show and self.stream.isatty()
        self.clock = clock
        self.start = self.last_draw = clock()
        self.done = 0
        self.logged_step = 0  # the last tenth a log line was written for
        self.width = 0  # of the terminal line drawn last, to blank what a shorter line leaves
        self.finished = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """The items, advancing by one after each; finished when they run out."""
        for item in items:
            yield item
            self.advance()
        self.finish()

    def advance(self, count: int = 1) -> None:
        if not self.show:
            return
        self.done = min(self.total, self.done + count)
        now = self.clock()
        if self.terminal:
            if now - self.last_draw >= REDRAW_S or self.done == self.total:
                self._draw(self._status(now))
                self.last_draw = now
            return
        step = self.done * LOG_STEPS // self.total
        if step > self.logged_step and now - self.start >= LOG_AFTER_S and self.done < self.total:
            self.logged_step = step
            self._line(self._status(now))

    def finish(self) -> None:
        if not self.show or self.finished:
            return
        self.finished = True
        summary = f"{self.what}: {self.done}/{self.total} {self.unit} in {_duration(self.clock() - self.start)}"
        if self.terminal:
            self._draw(summary)
            self.stream.write("\n")
            self.stream.flush()
        elif self.logged_step:
            self._line(summary)

    def _status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        # An ETA from the first second would mostly measure start-up (child processes, compiling).
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if elapsed >= 1 and self.done < self.total else ""
        percent = 100 * self.done // self.total
        return f"{self.what}: {self.done}/{self.total} {self.unit} ({percent}%), {rate:.1f} {self.unit}/s{eta}"

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
