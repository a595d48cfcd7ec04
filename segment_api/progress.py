"""Progress of delivery: totals of one connection, logged at most every so often."""

from __future__ import annotations

import logging
import threading
import time

# Progress lines ("N events delivered so far") are meant to be seen during a batch run, even
# when the application's root logger is at WARNING: this logger says INFO itself.
progress_log = logging.getLogger(__name__)
progress_log.setLevel(logging.INFO)


class Progress:
    """Totals of one connection (so of one worker process and configuration), logged at most
    every ``interval_s``: a long batch run shows it is moving, without a line per event."""

    def __init__(self):
        self._lock = threading.Lock()
        self.delivered = self.dead = self.disabled = self.requests = 0
        self._started = self._last = None

    def add(self, delivered: int, dead: int, disabled: int, requests: int, interval_s: float) -> None:
        line = None
        with self._lock:
            now = time.monotonic()
            if self._started is None:
                self._started = self._last = now
            self.delivered += delivered
            self.dead += dead
            self.disabled += disabled
            self.requests += requests
            if interval_s > 0 and now - self._last >= interval_s:
                self._last = now
                rate = self.delivered / max(now - self._started, 1e-9)
                line = (
                    f"delivery to Segment so far: {self.delivered} events delivered, {self.dead} "
                    f"dead-lettered"
                    + (f", {self.disabled} not sent (disable)" if self.disabled else "")
                    + f"; {self.requests} requests, {rate:.0f} events/s"
                )
        if line:
            progress_log.info(line)
