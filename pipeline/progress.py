"""Terminal progress of a job's stages, without dependencies.

One :class:`StageProgress` per stage (``ingest``, ``runs``, ``decompose``, ``group``)
counts items complete / skipped / failed out of a known total. On a terminal it redraws a
single line in place (``\\r``); elsewhere (logs, CI, captured output) it prints plain lines
through ``echo`` at most every ``interval`` seconds, plus one line per failure and a final
line, so logs stay short and readable.

:meth:`pipeline.jobs.Job.progress` (distributed's progress bar over the futures, for
notebooks) is separate and unchanged.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["StageProgress", "format_bytes", "is_live"]

STATUSES = ("complete", "skipped", "failed")


def format_bytes(n: float | None) -> str:
    """:func:`dask.utils.format_bytes`, with ``None -> 'n/a'`` (unknown sizes)."""
    from dask.utils import format_bytes as _format

    return "n/a" if n is None else _format(int(n))


def is_live(echo: Callable[..., object], stream: TextIO | None = None) -> bool:
    """Whether to redraw a terminal line: ``echo`` prints to ``stream``, a terminal.

    Only the default printers (:func:`print`, :func:`click.echo`) qualify: a custom
    ``echo`` (a logger, a silencer, a test capture) always gets plain lines.
    """
    stream = stream if stream is not None else sys.stdout
    printers: list[object] = [print]
    try:
        import click

        printers.append(click.echo)
    except ImportError:  # pragma: no cover - click is a core dependency
        pass
    try:
        return echo in printers and bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class StageProgress:
    """Progress of one stage over ``total`` items.

    Parameters
    ----------
    stage : str
        Stage name shown at the start of the line (``"runs"``).
    total : int
        Number of items expected.
    echo : callable, default=print
        Prints one line (``print``, ``click.echo``, a logger method).
    live : bool, default=False
        Redraw one line with ``\\r`` on ``stream`` (a terminal) instead of printing lines.
    stream : file, optional
        Where the live line is drawn (default: ``sys.stdout``).
    interval : float, default=10.0
        Seconds between plain progress lines (not live).
    width : int, default=24
        Characters of the bar.
    clock : callable, default=time.monotonic
        Time source (tests pass a fake clock).
    labels : dict, optional
        Display words of the statuses (``{"complete": "ingested"}``).

    Attributes
    ----------
    counts : dict
        ``status -> count`` for "complete", "skipped", "failed".
    bytes_read : int
        Sum of the ``nbytes`` passed to :meth:`update`.

    Examples
    --------
    >>> p = StageProgress("runs", 2, echo=print)
    >>> p.update("complete", "sub-01")
    >>> p.update("failed", "sub-02", error="boom")
    runs: sub-02 failed: boom
    >>> p.close()  # doctest: +ELLIPSIS
    runs: 2/2 (1 complete, 0 skipped, 1 failed) in ... s
    """

    def __init__(self, stage: str, total: int, *, echo: Callable[..., object] = print,
                 live: bool = False, stream: TextIO | None = None, interval: float = 10.0,
                 width: int = 24, clock: Callable[[], float] = time.monotonic,
                 labels: dict[str, str] | None = None) -> None:
        self.stage = stage
        self.total = int(total)
        self.echo = echo
        self.live = bool(live)
        self.stream = stream if stream is not None else sys.stdout
        self.interval = float(interval)
        self.width = int(width)
        self.clock = clock
        self.counts = dict.fromkeys(STATUSES, 0)
        self.labels = {s: (labels or {}).get(s, s) for s in STATUSES}
        self.bytes_read = 0
        self.start = clock()
        self.elapsed = 0.0
        self._last_line = self.start
        self._drawn = 0  # characters of the live line currently on screen
        self._closed = False
        self._lock = threading.Lock()  # ingest callbacks may come from worker threads
        if self.live and self.total:
            self._draw()

    @property
    def done(self) -> int:
        """Items finished so far, whatever their status."""
        return sum(self.counts.values())

    def line(self, *, bar: bool = False) -> str:
        """The progress text: ``runs [####----] 3/8 (2 complete, 0 skipped, 1 failed) ...``."""
        elapsed = (self.clock() - self.start) if not self._closed else self.elapsed
        head = self.stage
        if bar:
            frac = self.done / self.total if self.total else 0.0
            filled = min(self.width, round(frac * self.width))
            head += " [" + "#" * filled + "-" * (self.width - filled) + "]"
        else:
            head += ":"
        text = (f"{head} {self.done}/{self.total} (" + ", ".join(
            f"{self.counts[s]} {self.labels[s]}" for s in STATUSES) + f") in {elapsed:.1f} s")
        if self.bytes_read:
            text += f", {format_bytes(self.bytes_read)} read"
        return text

    def update(self, status: str, item: str | None = None, *, nbytes: int | None = None,
               error: str | None = None) -> None:
        """Count one finished item.

        Parameters
        ----------
        status : {"complete", "skipped", "failed"}
            Outcome of the item.
        item : str, optional
            Its name (a run id), shown for failures.
        nbytes : int, optional
            Bytes it read, added to :attr:`bytes_read`.
        error : str, optional
            Why it failed (printed on its own line).
        """
        if status not in self.counts:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        with self._lock:
            self.counts[status] += 1
            if nbytes:
                self.bytes_read += int(nbytes)
            if status == "failed":
                what = f"{item} failed" if item else "failed"
                self._message(f"{self.stage}: {what}" + (f": {error}" if error else ""))
            now = self.clock()
            if self.live:
                self._draw()
            elif now - self._last_line >= self.interval and self.done < self.total:
                self._last_line = now
                self.echo(self.line())

    def message(self, text: str) -> None:
        """Print a line of its own (above the live line on a terminal)."""
        with self._lock:
            self._message(text)

    def close(self) -> None:
        """Print the final line (once)."""
        with self._lock:
            if self._closed:
                return
            self.elapsed = self.clock() - self.start
            self._closed = True
            if self.live:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = 0
            else:
                self.echo(self.line())

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ private

    def _message(self, text: str) -> None:
        if self.live and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0
        self.echo(text)
        if self.live and not self._closed:
            self._draw()

    def _draw(self) -> None:
        text = self.line(bar=True)
        pad = max(0, self._drawn - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._drawn = len(text)
