"""The pipeline graph, from options and a compiled flow. No I/O of its own beyond the
sources and sinks it wires in; transform names are stable so Dataflow can update a job.
"""

from __future__ import annotations

import apache_beam as beam

from decide.calls import EventCalls
from decide.destination import DestinationSpec, compiled
from decide.wire import EventMessages
from segment_api.connection import SendOptions
from transforms import DEAD_LETTER_TAG
from transforms.batching import BatchDeliveries
from transforms.chunks import Chunk, GatherChunks
from transforms.dead_letters import CountDeadLetters, ReadPreviousAttempts, WriteDeadLetters
from transforms.dedup import DecideIdentity, DeduplicateIdentity
from transforms.files import ReadLimits
from transforms.read import ReadEvents
from transforms.send import BatchAndSend, SendToSegment
from transforms.steps import AssignIdentity, GateConsent, MapEvents, ParseEventsAtElementTime, PlanEvents


class Outputs:
    """What the pipeline gives back: ``delivered`` (EventMessages, one per delivered event) and
    ``dead_letters`` (DeadLetter, one per failed input or event)."""

    def __init__(self, delivered: beam.PCollection, dead_letters: beam.PCollection, in_lists: bool):
        self._delivered = delivered
        self._in_lists = in_lists
        self.dead_letters = dead_letters

    @property
    def delivered(self) -> beam.PCollection:
        # A batch run's sink hands its delivered events on as one list per request: one by one
        # only for whoever reads them (tests; the command does not), so a run pays nothing for it.
        if self._in_lists:
            self._delivered = self._delivered | "EachDelivered" >> beam.FlatMap(lambda delivered: delivered)
            self._in_lists = False
        return self._delivered


def build_pipeline(
    p: beam.Pipeline,
    spec: DestinationSpec,
    *,
    streaming: bool,
    read: beam.PTransform | None = None,
    send_options: SendOptions | None = None,
    dead_letter_sink: beam.PTransform | None = None,
    previous_attempts: beam.PTransform | None = None,
) -> Outputs:
    """Wire the whole path into ``p``. ``read`` yields raw payloads (default: nothing — tests
    and the command line always pass one), or lists of them (a chunked ReadEvents);
    ``dead_letter_sink`` writes the dead letters."""
    destination = compiled(spec)  # compiles now: configuration errors surface before the job starts
    raw = p | "ReadEvents" >> read
    if streaming:
        planned, parse_dead = _planned_one_by_one(raw, spec)
    else:
        # A batch run hands lists of payloads from step to step (transforms.chunks).
        plan = beam.ParDo(PlanEvents(spec)).with_output_types(Chunk)
        planned = _chunks(raw, read, "Chunks") | "PlanEvents" >> plan.with_outputs(DEAD_LETTER_TAG, main="calls")
        parse_dead = None
    if destination.needs_identity_state and not streaming:
        # Decided on a second read of the input (files are re-readable; Pub/Sub is streaming
        # only): the shuffle then carries a small record per event, not the event.
        again = read.second_read() if isinstance(read, ReadEvents) else read
        to_decide = _chunks(p | "ReadEventsToDecide" >> again, again, "ChunksToDecide")
        decisions = to_decide | "DecideIdentity" >> DecideIdentity(spec)
        deliveries = planned.calls | "DeduplicateIdentity" >> DeduplicateIdentity(spec, streaming, decisions)
    elif destination.needs_identity_state:
        deliveries = planned.calls | "DeduplicateIdentity" >> DeduplicateIdentity(spec, streaming)
    else:
        # No identify or group anywhere in the flow: nothing to remember per user.
        if streaming:
            deliveries = planned.calls | "NoIdentityState" >> beam.Map(_without_state)
        else:
            deliveries = planned.calls | "NoIdentityState" >> beam.Map(_chunk_without_state).with_output_types(Chunk)
    send_options = send_options or SendOptions()
    if streaming:
        # Streaming bundles are small: batches are gathered across them in Beam state.
        deliveries = deliveries | "BatchCalls" >> BatchDeliveries(spec.settings, send_options, streaming=True)
        sink = SendToSegment(spec.settings, spec.flow_name, send_options)
    else:
        # A batch run's bundles are large: batches fill up within them, with no shuffle.
        sink = BatchAndSend(spec.settings, spec.flow_name, send_options)
    send = beam.ParDo(sink) if streaming else beam.ParDo(sink).with_output_types(Chunk)
    sent = deliveries | "SendToSegment" >> send.with_outputs(DEAD_LETTER_TAG, main="delivered")
    failed = (planned[DEAD_LETTER_TAG], sent[DEAD_LETTER_TAG])
    dead = (
        ((parse_dead, *failed) if parse_dead is not None else failed)
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDeadLetters" >> CountDeadLetters(previous_attempts, spec.namespace)
    )
    if dead_letter_sink is not None:
        dead | "WriteDeadLetters" >> dead_letter_sink
    return Outputs(sent.delivered, dead, in_lists=not streaming)


def _planned_one_by_one(raw: beam.PCollection, spec: DestinationSpec):
    """Streaming: one step a DoFn, one message an element (names kept: a running job's update
    matches its steps by name)."""
    parsed = raw | "ParseEvents" >> beam.ParDo(ParseEventsAtElementTime(spec.collector, spec.flow_name)).with_outputs(
        DEAD_LETTER_TAG, main="events"
    )
    gated = parsed.events | "GateConsent" >> beam.ParDo(GateConsent(spec))
    mapped = gated | "MapEvents" >> beam.ParDo(MapEvents(spec))
    planned = mapped | "AssignIdentity" >> beam.ParDo(AssignIdentity(spec)).with_outputs(DEAD_LETTER_TAG, main="calls")
    return planned, parsed[DEAD_LETTER_TAG]


def _chunks(raw: beam.PCollection, read, label: str) -> beam.PCollection:
    """Lists of payloads: as a chunked ReadEvents reads them, else gathered (a test's read)."""
    if getattr(read, "chunked", False):
        return raw
    return raw | label >> beam.ParDo(GatherChunks()).with_output_types(Chunk)


def _without_state(keyed: tuple[str, EventCalls]) -> EventMessages:
    calls = keyed[1]
    return EventMessages(calls.event, calls.messages(identify=False, group=False))  # the flow has none


def _chunk_without_state(planned: list[tuple[str, EventCalls]]) -> Chunk:
    return Chunk(_without_state(keyed) for keyed in planned)


def build_from_options(p: beam.Pipeline, spec: DestinationSpec, opts, streaming: bool, local: bool = False) -> Outputs:
    """``local``: on a local runner, records read whole are not spread over workers (there are
    none to spread to, and the FnApiRunner would hold every payload in memory for it)."""
    read = ReadEvents(
        opts.input,
        opts.input_format,
        opts.input_subscription,
        opts.input_topic,
        opts.id_label,
        opts.timestamp_attribute,
        ReadLimits(opts.max_inflation_ratio, opts.max_inflated_mb * 1024**2),
        spread=not local,
        chunked=not streaming,
    )
    sink = WriteDeadLetters(opts.dead_letter, opts.dead_letter_format, opts.dead_letter_topic, streaming)
    send_options = SendOptions(
        flush_deadline_s=opts.flush_deadline_seconds,
        fail_bundle_on_error=opts.fail_bundle_on_delivery_error,
        shards=opts.delivery_shards,
        progress_interval_s=opts.progress_interval_seconds,
    )
    # A replay run: its dead letters that fail again carry the previous attempt count plus one.
    previous = ReadPreviousAttempts(opts.input) if opts.input and opts.input_format == "dead_letter" else None
    return build_pipeline(
        p,
        spec,
        streaming=streaming,
        read=read,
        send_options=send_options,
        dead_letter_sink=sink,
        previous_attempts=previous,
    )
