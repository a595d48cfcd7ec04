"""Sending to Segment in Beam: batches in, delivered events and dead letters out.

How events become batches depends on the run (``pipeline.graph`` wires one or the other):

* batch runs: :class:`BatchAndSend` cuts batches within each bundle (a batch run's bundles are
  large) and sends the last, partial one in ``finish_bundle``: no shuffle, no state;
* streaming: :class:`~transforms.batching.BatchDeliveries` gathers each event's messages across
  bundles in Beam state; :class:`SendToSegment` sends each batch.

Both send through a :class:`~segment_api.sender.PipelinedSender` over a pooled
:class:`~segment_api.connection.SegmentConnection` (the next batch is prepared while the
previous one is on the wire), and every event of a bundle is settled, delivered or
dead-lettered, before the bundle commits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from decide import dead_letter as dl
from decide.settings import SegmentSettings
from decide.wire import Batcher, EventMessages
from segment_api.connection import (
    DEFAULT_ENDPOINT_ERROR_HOLD_S,
    BatchResult,
    SegmentConnection,
    SendOptions,
    acquire_connection,
    release_connection,
)
from segment_api.sender import PipelinedSender, _Sent
from transforms import DEAD_LETTER_TAG, NAMESPACE
from transforms.chunks import Chunk
from transforms.metrics import counter

log = logging.getLogger(__name__)


def _count(name: str) -> None:
    counter(name).inc()


class _SegmentSink(beam.DoFn):
    """What both sinks share: a pooled connection, a :class:`PipelinedSender`, and the outputs
    and counters of a settled batch. Everything of a bundle is settled (accepted by Segment or
    dead-lettered) in ``finish_bundle`` at the latest, so before the bundle commits.

    Delivered events leave on the main output, dead letters on ``dead_letter``. With
    ``fail_bundle_on_error``, events that failed for a transient reason (5xx, 429, timeouts, after
    the SDK's retries) fail the bundle instead, so the runner retries it; refusals that a retry
    cannot fix (``too_large``, ``rejected``, ``invalid_call``) are dead-lettered either way.
    Counters are incremented here, on the bundle's thread: Beam's metrics belong to the thread
    that runs the bundle (the request's helper thread reports its answer, never counts).

    An endpoint-wide refusal (401, 403, 404, a redirect) dead-letters nothing: a batch run fails
    at once with :class:`~segment_api.http.EndpointConfigError`; the streaming sink
    (:class:`SendToSegment`) holds the batch and probes the endpoint for
    ``options.endpoint_error_hold_s``, then fails the bundle so the runner retries it.
    """

    hold_endpoint_errors = False
    # Delivered events leave one by one, or (a batch run) as one list per request.
    delivered_in_lists = False

    def __init__(self, settings: SegmentSettings, flow: str, options: SendOptions | None = None):
        self.settings = settings
        self.flow = flow
        self.options = options or SendOptions()
        self.batch_messages = Metrics.distribution(NAMESPACE, "messages_per_batch")
        self.request_latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self.connection: SegmentConnection | None = None
        self.sender: PipelinedSender | None = None
        self._connection_key: str | None = None

    def setup(self):
        self._connection_key, self.connection = acquire_connection(self.settings, self.options)
        self.connection.count = _count
        hold_s = 0.0
        if self.hold_endpoint_errors:
            hold_s = self.options.endpoint_error_hold_s
            hold_s = DEFAULT_ENDPOINT_ERROR_HOLD_S if hold_s is None else hold_s
        self.sender = PipelinedSender(self.connection, self.flow, hold_s)

    def _outputs(self, settled: list[tuple[_Sent, BatchResult]], finishing: bool = False) -> Iterator:
        for sent, result in settled:
            yield from self._outputs_of(sent, result, finishing)

    def _outputs_of(self, sent: _Sent, result: BatchResult, finishing: bool) -> Iterator:
        self.connection.progress.add(
            len(result.delivered),
            len(result.failed),
            len(result.disabled),
            len(result.requests),
            self.options.progress_interval_s,
        )
        counter("requests_to_segment").inc(len(result.requests))
        for messages, millis in result.requests:
            self.batch_messages.update(messages)
            self.request_latency.update(millis)
        if self.options.fail_bundle_on_error:
            transient = [dead for _, dead in result.failed if dead.reason == dl.DELIVERY_FAILED]
            if transient:
                raise RuntimeError(
                    f"{len(transient)} event(s) could not be delivered to Segment; failing the "
                    f"bundle so the runner retries it (first: {transient[0].error})"
                )
        calls_by_type: dict[str, int] = {}
        delivered_calls = 0
        for delivery in result.delivered:
            delivered_calls += len(delivery.messages)
            for message in delivery.messages:
                calls_by_type[message["type"]] = calls_by_type.get(message["type"], 0) + 1
        if self.delivered_in_lists:
            if result.delivered:
                yield _stamped(Chunk(result.delivered), sent.stamp, finishing)
        else:
            for delivery in result.delivered:
                yield _stamped(delivery, sent.stamp, finishing)
        counter("events_delivered").inc(len(result.delivered))
        counter("events_delivered_calls").inc(delivered_calls)
        for kind, n in calls_by_type.items():
            counter(f"calls_sent_{kind}").inc(n)
        if result.disabled:
            counter("events_disabled").inc(len(result.disabled))
            counter("calls_disabled").inc(sum(len(d.messages) for d in result.disabled))
        for _, dead in result.failed:
            counter("events_dead_lettered_at_send").inc()
            counter(f"dead_letter_{dead.reason}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, _stamped(dead, sent.stamp, finishing))

    def finish_bundle(self):
        yield from self._outputs(self.sender.drain(), finishing=True)

    def teardown(self):
        # Everything was already settled before each bundle ended; this only hands the client
        # back (and, after the grace period, shuts it down).
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if self._connection_key is not None and self.connection is not None:
            release_connection(self._connection_key, self.connection)
            self._connection_key, self.connection = None, None


def _stamped(value, stamp: tuple[Any, Any] | None, finishing: bool):
    """``value`` as an output of the input it came from: outputs of an earlier element, and all
    of ``finish_bundle``'s, need their timestamp and window said explicitly; in the global window
    (a batch run) only ``finish_bundle``'s do."""
    if stamp is not None:
        return WindowedValue(value, stamp[0], (stamp[1],))
    return GlobalWindows.windowed_value(value) if finishing else value


class SendToSegment(_SegmentSink):
    """Sink for batches made upstream (:class:`BatchDeliveries`, streaming): each input is a list of
    :class:`EventMessages`, one request's worth."""

    hold_endpoint_errors = True

    def process(self, batch: Iterable[EventMessages], timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        deliveries = list(batch)
        if deliveries:
            yield from self._outputs(self.sender.submit(deliveries, (timestamp, window)))


class BatchAndSend(_SegmentSink):
    """Sink for a batch run: each input is a chunk (list) of :class:`EventMessages`; batches are
    cut within the bundle by the rules of :func:`split_batches` (``flushAt`` calls, under the
    request limits, an event's calls never split) and the last, partial one is sent in
    ``finish_bundle``. Delivered events leave as one list per request.

    A batch run's bundles are large, so batches fill up without Beam state: no shuffle, and the
    next batch is mapped while the previous one is on the wire. (Streaming bundles are small:
    there :class:`BatchDeliveries` gathers across bundles in state.)

    For the global window only, as in a batch run: ``process`` takes no timestamp or window
    (asking for them takes a slower path of Beam's Python SDK for every element), so its outputs carry the
    global window.
    """

    def __init__(self, settings: SegmentSettings, flow: str, options: SendOptions | None = None):
        super().__init__(settings, flow, options)
        self.flush_at = settings.flush_at

    def start_bundle(self):
        self.batcher: Batcher[EventMessages] = Batcher(self.flush_at)

    delivered_in_lists = True

    def process(self, deliveries: list[EventMessages]):
        add = self.batcher.add
        for delivery in deliveries:
            for batch in add(delivery, len(delivery.messages), delivery.measure()):
                yield from self._submit(batch)

    def _submit(self, batch: list[EventMessages], finishing: bool = False) -> Iterator:
        counter("batches_flushed_in_bundle").inc()
        yield from self._outputs(self.sender.submit(batch), finishing)

    def finish_bundle(self):
        rest = self.batcher.take()
        if rest:
            yield from self._submit(rest, finishing=True)
        yield from super().finish_bundle()
