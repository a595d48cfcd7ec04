"""The pipeline graph, from options and a compiled flow. No I/O of its own beyond the
sources and sinks it wires in; transform names are stable so Dataflow can update a job.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam

from decide.calls import EventCalls
from decide.destination import DestinationSpec, compiled
from decide.wire import EventMessages
from segment_api.connection import SendOptions
from transforms import DEAD_LETTER_TAG
from transforms.batching import BatchDeliveries
from transforms.dead_letters import CountDeadLetters, ReadPreviousAttempts, WriteDeadLetters
from transforms.dedup import DecideIdentity, DeduplicateIdentity
from transforms.files import ReadLimits
from transforms.read import ReadEvents
from transforms.send import BatchAndSend, SendToSegment
from transforms.steps import AssignIdentity, GateConsent, MapEvents, ParseEvents, ParseEventsAtElementTime


@dataclass
class Outputs:
    delivered: beam.PCollection  # EventMessages per delivered event
    dead_letters: beam.PCollection  # DeadLetter per failed input or event


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
    and the command line always pass one); ``dead_letter_sink`` writes the dead letters."""
    destination = compiled(spec)  # compiles now: configuration errors surface before the job starts
    raw = p | "ReadEvents" >> read
    parse = ParseEventsAtElementTime if streaming else ParseEvents
    parsed = raw | "ParseEvents" >> beam.ParDo(parse(spec.collector, spec.flow_name)).with_outputs(
        DEAD_LETTER_TAG, main="events"
    )
    gated = parsed.events | "GateConsent" >> beam.ParDo(GateConsent(spec))
    mapped = gated | "MapEvents" >> beam.ParDo(MapEvents(spec))
    planned = mapped | "AssignIdentity" >> beam.ParDo(AssignIdentity(spec)).with_outputs(DEAD_LETTER_TAG, main="calls")
    if destination.needs_identity_state and not streaming:
        # Decided on a second read of the input (files are re-readable; Pub/Sub is streaming
        # only): the shuffle then carries a small record per event, not the event.
        again = read.second_read() if isinstance(read, ReadEvents) else read
        decisions = p | "ReadEventsToDecide" >> again | "DecideIdentity" >> DecideIdentity(spec)
        deliveries = planned.calls | "DeduplicateIdentity" >> DeduplicateIdentity(spec, streaming, decisions)
    elif destination.needs_identity_state:
        deliveries = planned.calls | "DeduplicateIdentity" >> DeduplicateIdentity(spec, streaming)
    else:
        # No identify or group anywhere in the flow: nothing to remember per user.
        deliveries = planned.calls | "NoIdentityState" >> beam.Map(_without_state)
    send_options = send_options or SendOptions()
    if streaming:
        # Streaming bundles are small: batches are gathered across them in Beam state.
        deliveries = deliveries | "BatchCalls" >> BatchDeliveries(spec.settings, send_options, streaming=True)
        sink = SendToSegment(spec.settings, spec.flow_name, send_options)
    else:
        # A batch run's bundles are large: batches fill up within them, with no shuffle.
        sink = BatchAndSend(spec.settings, spec.flow_name, send_options)
    sent = deliveries | "SendToSegment" >> beam.ParDo(sink).with_outputs(DEAD_LETTER_TAG, main="delivered")
    dead = (
        (parsed[DEAD_LETTER_TAG], planned[DEAD_LETTER_TAG], sent[DEAD_LETTER_TAG])
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDeadLetters" >> CountDeadLetters(previous_attempts, spec.namespace)
    )
    if dead_letter_sink is not None:
        dead | "WriteDeadLetters" >> dead_letter_sink
    return Outputs(delivered=sent.delivered, dead_letters=dead)


def _without_state(keyed: tuple[str, EventCalls]) -> EventMessages:
    calls = keyed[1]
    return EventMessages(calls.event, calls.messages(identify=False, group=False))  # the flow has none


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
