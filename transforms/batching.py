"""Streaming: each event's messages gathered into batches across bundles, in Beam state.

A streaming bundle is small, so batches are kept in state per shard and flushed at ``flushAt``
calls, before a request limit would pass, ``flushInterval`` ms after a batch's first event, and
at the end of the window (a drain): nothing waits only in memory. The cutting rule is
:mod:`decide.wire`'s.
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections.abc import Callable

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from decide.identity import state_key_of_messages
from decide.settings import INT_SETTINGS, SegmentSettings
from decide.wire import EventMessages, clamped_flush_at, exceeds_request_limits
from segment_api.connection import AUTO_SHARDS, SendOptions
from transforms.metrics import counter

# Unique to this worker process: with the thread, it names the shard of whatever this thread
# delivers (the scheme of Beam's GroupIntoBatches.WithShardedKey), so shards come and go with
# the workers' threads, as autoscaling and updates change them.
_PROCESS_SHARD = uuid.uuid4().hex[:12]


def worker_shard(_delivery: EventMessages) -> str:
    """The shard of a delivery when shards follow the job's parallelism (AUTO_SHARDS)."""
    return f"{_PROCESS_SHARD}:{threading.get_ident():x}"


def user_shard(delivery: EventMessages, shards: int) -> str:
    """A stable shard by user (the state key), so one user's calls share a shard and stay in
    order; by event id when the messages name no user."""
    key = state_key_of_messages(delivery.messages) or delivery.event.get("id") or ""
    return str(zlib.crc32(str(key).encode()) % max(1, shards))


class _BatchInState(beam.DoFn):
    """Per shard: deliveries buffered in a bag until a flush rule says the batch is complete.

    Timers, chosen so every runner flushes everything:

    * ``flush_interval`` (processing time, streaming only) fires ``flushInterval`` ms after a
      batch's first event. The clock is injectable, because under TestStream processing time
      starts at 0. Not set in batch: there the FnApiRunner fails the run on a processing-time
      timer that is not due yet when its work runs out ("time-pending bundles did not
      execute"), and the bundle-based DirectRunner drops them (losing the batch).
    * ``end_of_window`` (event time, the window's end) fires when the watermark passes the end
      of the (global) window: at the end of a batch run on every runner, after a TestStream's
      last watermark, and when a Dataflow streaming job is drained.
    """

    BUFFER = BagStateSpec("buffer", PickleCoder())
    PENDING = ReadModifyWriteStateSpec("pending", PickleCoder())  # (calls, bytes, first timestamp)
    FLUSH = TimerSpec("flush_interval", TimeDomain.REAL_TIME)
    END = TimerSpec("end_of_window", TimeDomain.WATERMARK)

    def __init__(
        self, flush_at: int, flush_interval_ms: int, streaming: bool, clock: Callable[[], float] | None = None
    ):
        self.flush_at = clamped_flush_at(flush_at)
        self.flush_interval_s = max(0, int(flush_interval_ms)) / 1000.0
        self.streaming = streaming
        self.clock = clock

    def process(
        self,
        keyed,
        timestamp=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        buffer=beam.DoFn.StateParam(BUFFER),
        pending=beam.DoFn.StateParam(PENDING),
        flush=beam.DoFn.TimerParam(FLUSH),
        end=beam.DoFn.TimerParam(END),
    ):
        _, delivery = keyed
        calls, size = len(delivery.messages), delivery.measure()
        state = pending.read()
        if state is not None and exceeds_request_limits(state[0], state[1], calls, size):
            yield self._take(buffer, pending, state)
            state = None
        if state is None:
            state = (0, 0, timestamp)
            if self.streaming:
                flush.set(Timestamp.of((self.clock or time.time)() + self.flush_interval_s))
            end.set(window.max_timestamp())
        buffer.add(delivery)
        state = (state[0] + calls, state[1] + size, min(state[2], timestamp))
        if state[0] >= self.flush_at:
            yield self._take(buffer, pending, state)
            # Nothing waits under this key any more: no timer is left behind for it (with
            # worker shards, the keys of stopped workers are never seen again).
            if self.streaming:
                flush.clear()
            end.clear()
        else:
            pending.write(state)

    @on_timer(FLUSH)
    def on_flush_interval(self, buffer=beam.DoFn.StateParam(BUFFER), pending=beam.DoFn.StateParam(PENDING)):
        yield from self._flush_on_timer(buffer, pending, "flush_interval")

    @on_timer(END)
    def on_end_of_window(self, buffer=beam.DoFn.StateParam(BUFFER), pending=beam.DoFn.StateParam(PENDING)):
        yield from self._flush_on_timer(buffer, pending, "end_of_window")

    def _flush_on_timer(self, buffer, pending, why: str):
        state = pending.read()
        if state is None:
            return  # flushed by size since the timer was set
        counter(f"batches_flushed_by_{why}").inc()
        # A timer's output carries the timer's time (processing time for flush_interval, which
        # can be anything): give the batch its first event's time instead, which the timer's
        # watermark hold protects, so windowed writes downstream do not see it as late.
        yield TimestampedValue(self._take(buffer, pending, state), state[2])

    @staticmethod
    def _take(buffer, pending, state) -> list[EventMessages]:
        batch = list(buffer.read())
        buffer.clear()
        pending.clear()
        return batch


class BatchDeliveries(beam.PTransform):
    """Each event's messages → batches for one request each (``flushAt`` calls or ``flushInterval`` ms,
    under 2,500 messages and :data:`MAX_BATCH_BYTES`), batched in Beam state over
    ``options.shards`` keys. ``settings`` may be a bare ``flush_at`` (interval: the default).
    ``streaming``: flush after ``flushInterval`` (in batch, batches fill up, the rest at the end)."""

    def __init__(self, settings: SegmentSettings | int, options: SendOptions | None = None, *, streaming: bool = False):
        super().__init__()
        self.streaming = streaming
        if isinstance(settings, int):
            self.flush_at, self.flush_interval_ms = settings, INT_SETTINGS["flushInterval"]
        else:
            self.flush_at, self.flush_interval_ms = settings.flush_at, settings.flush_interval_ms
        self.options = options or SendOptions()

    def expand(self, deliveries):
        shards = int(self.options.shards)
        # Changing the number of shards (or the workers, with worker shards) on an update loses
        # nothing: a key no longer used still holds its batch and timers, which send it.
        shard_of = worker_shard if shards <= AUTO_SHARDS else (lambda d: user_shard(d, shards))
        return (
            deliveries
            | "ShardKey" >> beam.Map(lambda d: (shard_of(d), d)).with_output_types(tuple[str, EventMessages])
            | "Gather"
            >> beam.ParDo(_BatchInState(self.flush_at, self.flush_interval_ms, self.streaming, self.options.clock))
        )
