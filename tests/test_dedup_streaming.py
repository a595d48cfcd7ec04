"""DeduplicateIdentity in streaming: per-key state, cleared by the expiry timer (TestStream)."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from support import flow_document, make_spec

from decide.destination import compiled
from transforms.dedup import DeduplicateIdentity

TTL_S = 60
T0 = 1_700_000_000_000


def planned(spec, event_id: int, user: str, email: str = "a@x"):
    """An event through the per-event steps, as AssignIdentity emits it: (key, EventCalls)."""
    destination = compiled(spec)
    event = {
        "name": "page view",
        "id": f"{event_id:016x}",
        "timestamp": T0 + event_id,  # event times ~equal:
        "entity": "page",
        "action": "view",
        "data": {},
        "globals": {},
        "context": {},
        "custom": {},
        "nested": [],
        "consent": {},
        "user": {"id": user, "session": f"s-{user}", "email": email},
    }
    calls = destination.plan(destination.to_mapped(destination.mapping_result(event), event))
    return calls.key, calls


def test_identify_fires_again_only_after_the_expiry_timer_cleared_the_state():
    spec = make_spec(
        flow_document(settings={"identify": {"map": {"traits": {"map": {"email": "user.email"}}}}}), ttl_ms=TTL_S * 1000
    )
    # Event timestamps are all within the TTL, so only the timer (driven by the watermark) can
    # clear the state: the re-identify after it proves the timer fired, and fired on time.
    stream = (
        test_stream.TestStream()
        .add_elements([TimestampedValue(planned(spec, 1, "A"), 0)])
        .add_elements([TimestampedValue(planned(spec, 2, "B"), 1)])
        .advance_watermark_to(30)
        .add_elements([TimestampedValue(planned(spec, 3, "A"), 30)])  # 30 s idle: still known
        .advance_watermark_to(30 + TTL_S - 1)
        .add_elements([TimestampedValue(planned(spec, 4, "A"), 30 + TTL_S - 1)])  # 59 s: still known
        .advance_watermark_to(200)  # A's and B's timers fire
        .add_elements([TimestampedValue(planned(spec, 5, "A"), 200), TimestampedValue(planned(spec, 6, "B"), 200)])
        .advance_watermark_to(201)
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions([], streaming=True)
    with test_pipeline.TestPipeline(options=options) as p:
        out = (
            p
            | stream
            | DeduplicateIdentity(spec, streaming=True)
            | beam.Map(lambda d: (int(d.event["id"], 16), tuple(m["type"] for m in d.messages)))
        )
        assert_that(
            out,
            equal_to(
                [
                    (1, ("identify", "track")),
                    (2, ("identify", "track")),
                    (3, ("track",)),
                    (4, ("track",)),
                    (5, ("identify", "track")),
                    (6, ("identify", "track")),
                ]
            ),
        )
