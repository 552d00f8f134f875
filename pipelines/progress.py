"""Live progress of a build: workers note what each stage did, the driver prints one line.

Workers (threads or processes on this machine) add their counts to a per-process table and write
it, at most every `FLUSH_EVERY_S`, to `<progress_dir>/<pid>.json`. The driver's `ProgressLine`
thread sums those files every second and prints files done, segments, rows, audio hours, x real
time and an ETA from the file rate. The sources are listed in the pipeline, so the number of files
is not known when the run starts: the listing reports what it has found so far (`LISTING_SLOT`'s
"in") and, once complete, the total (its "out"); until then the line shows no ETA. On a remote runner (Dataflow) there is no shared folder and no
line: its own console shows progress.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict

FLUSH_EVERY_S = 0.5
LISTING_SLOT = "_listing"  # pipelines/read_sources.py: records found ("in"), the total once listed ("out")
_table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
_guard = threading.Lock()
_last_flush = 0.0


def report(progress_dir: str, slot: str, n_in: int, n_out: int, audio_s: float, busy_s: float) -> None:
    with _guard:
        row = _table[slot]
        row["in"] += n_in
        row["out"] += n_out
        row["audio_s"] += audio_s
        row["busy_s"] += busy_s
        due = time.monotonic() - _last_flush >= FLUSH_EVERY_S
    if due:
        flush(progress_dir)


def flush(progress_dir: str) -> None:
    global _last_flush
    with _guard:
        snapshot = {slot: dict(row) for slot, row in _table.items()}
        _last_flush = time.monotonic()
    path = os.path.join(progress_dir, f"{os.getpid()}.json")
    temp = f"{path}.{threading.get_ident()}.tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(snapshot, handle)
    os.replace(temp, path)


def read_totals(progress_dir: str) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name in os.listdir(progress_dir):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(progress_dir, name), encoding="utf-8") as handle:
                table = json.load(handle)
        except (OSError, ValueError):  # being replaced right now: next second
            continue
        for slot, row in table.items():
            for key, value in row.items():
                totals[slot][key] += value
    return totals


class ProgressLine:
    """Prints `files 120/240 | segments 118 | rows 100 | 0.21 h audio | 95x real time | ETA 12 s`,
    or `files 120 (240 listed so far) | ...` while the listing is still going (`total_files` None).

    On a terminal the line is rewritten in place every second; otherwise a line is printed every
    `plain_every_s`. Either way the final state is printed when the run ends.
    """

    def __init__(self, progress_dir: str, *, total_files: int | None, first_slot: str, split_slot: str | None,
                 last_slot: str, stream=None, plain_every_s: float = 10.0):
        self.dir, self.total = progress_dir, total_files
        self.first, self.split, self.last = first_slot, split_slot, last_slot
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="echat-progress", daemon=True)
        self._started = time.monotonic()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        # The last state, always: on a terminal it completes the live line, in a log it is the line.
        self.stream.write(("\r" + self.line().ljust(100) if self.tty else self.line()) + "\n")
        self.stream.flush()

    def line(self) -> str:
        totals = read_totals(self.dir)
        elapsed = max(1e-6, time.monotonic() - self._started)
        files = int(totals.get(self.first, {}).get("in", 0))
        audio_s = totals.get(self.first, {}).get("audio_s", 0.0)
        segments = int(totals.get(self.split, {}).get("out", 0)) if self.split else 0
        rows = int(totals.get(self.last, {}).get("out", 0))
        listing = totals.get(LISTING_SLOT, {})
        total = self.total if self.total is not None else (int(listing["out"]) if listing.get("out") else None)
        eta = ""
        if total is None:
            done = f"{files} ({int(listing.get('in', 0))} listed so far)"
        else:
            done = f"{files}/{total}"
            if 0 < files < total:
                eta = f" | ETA {(total - files) * elapsed / files:.0f} s"
        return (f"files {done} | segments {segments} | rows {rows} | "
                f"{audio_s / 3600:.3f} h audio | {audio_s / elapsed:.0f}x real time{eta}")

    def _loop(self) -> None:
        last_plain = time.monotonic()
        while not self._stop.wait(1.0):
            text = self.line()
            if self.tty:
                self.stream.write("\r" + text.ljust(100))
                self.stream.flush()
            elif time.monotonic() - last_plain >= self.plain_every_s:
                last_plain = time.monotonic()
                self.stream.write(text + "\n")
                self.stream.flush()
