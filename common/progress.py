"""Progress bars that also show in logs: on a terminal tqdm redraws its bar; when stderr is not a terminal
(a log file, a pipe, compare.py's captured runs) the bar is written as one plain line at most every
LOG_INTERVAL seconds (set MEDSAM_PROGRESS_INTERVAL to change it, 0 for every update) instead of being hidden."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_INTERVAL = float(os.environ.get("MEDSAM_PROGRESS_INTERVAL", "30"))


class _LineWriter:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, desc: str = "", total=None, disable: bool = False, leave: bool = False, **kwargs):
    """tqdm over `iterable`: a live bar on a terminal, one line per LOG_INTERVAL seconds otherwise."""
    if disable:
        return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, leave=leave, **kwargs)
    return tqdm(iterable, desc=desc, total=total, leave=True, file=_LineWriter(sys.stderr), mininterval=LOG_INTERVAL,
                maxinterval=max(LOG_INTERVAL, 10.0), ascii=True, ncols=100, **kwargs)
