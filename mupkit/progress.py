"""A dependency-free progress bar on stderr (one line per item when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")


def progress(items: Sequence[T], title: str, *, enabled: bool = True,
             label: Callable[[T], str] = str, width: int = 24) -> Iterable[T]:
    if not enabled:
        yield from items
        return
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    total = len(items)
    for i, item in enumerate(items):
        done = int(width * i / total)
        line = f"{title} [{'#' * done}{'.' * (width - done)}] {i}/{total} {label(item)} " \
               f"{time.perf_counter() - start:5.1f}s"
        sys.stderr.write(("\r" + line) if tty else line + "\n")
        sys.stderr.flush()
        yield item
    sys.stderr.write(("\r" if tty else "") + f"{title} [{'#' * width}] {total}/{total} done in "
                     f"{time.perf_counter() - start:.1f}s" + " " * 20 + "\n")
