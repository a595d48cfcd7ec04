"""Sending while the next batch is prepared: one batch on the wire, one being filled."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from decide.wire import EventMessages
from segment_api.connection import BatchResult, SegmentConnection, _Batch

log = logging.getLogger(__name__)


@dataclass
class _Sent:
    """One batch handed to the sender: its deliveries, and the timestamp and window its outputs
    carry (None: the global window, as in a batch run)."""

    deliveries: list[EventMessages]
    stamp: tuple[Any, Any] | None
    batch: _Batch


class PipelinedSender:
    """Sends batches through one :class:`SegmentConnection` so that the caller prepares (maps,
    batches) the next batch while the previous one is on the wire.

    ``submit`` checks a batch, puts it on the wire and returns at once; the connection's helper
    thread waits for Segment meanwhile (without the GIL). The next ``submit`` first waits for
    that batch's answer and returns it settled, so one batch is on the wire at a time and one
    more is being filled; ``drain`` waits for the last one, so a caller that drains before its
    bundle commits loses nothing. ``hold_s``: how long an endpoint-wide refusal is probed again
    before it fails the bundle (streaming; 0 raises at once).
    """

    def __init__(self, connection: SegmentConnection, flow: str, hold_s: float = 0.0):
        self.connection = connection
        self.flow = flow
        self.hold_s = hold_s
        self._on_wire: _Sent | None = None

    def submit(
        self, deliveries: list[EventMessages], stamp: tuple[Any, Any] | None = None
    ) -> list[tuple[_Sent, BatchResult]]:
        settled = self.drain()
        self._on_wire = _Sent(deliveries, stamp, self.connection.start(deliveries, self.flow))
        return settled

    def drain(self) -> list[tuple[_Sent, BatchResult]]:
        sent, self._on_wire = self._on_wire, None
        if sent is None:
            return []
        return [(sent, self.connection.finish(sent.batch, self.hold_s))]

    def close(self) -> None:
        """After a failed bundle a batch may still be on the wire: wait for it (bounded by the
        flush deadline) so the pooled connection is free; its events' bundle is retried."""
        try:
            sent, self._on_wire = self._on_wire, None
            if sent is not None:
                self.connection.finish(sent.batch)
        except Exception:  # best-effort: the bundle already failed
            log.warning("settling the last batch after a failed bundle failed", exc_info=True)
