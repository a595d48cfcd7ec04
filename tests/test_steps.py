"""The per-event DoFns on Beam: what they count and where they take time from."""

import logging

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from support import flow_document, make_spec

from pipeline.explain import explain_payloads
from pipeline.summary import counters
from transforms.steps import ParseEventsAtElementTime, PlanEvents, compiled


def test_a_pubsub_event_without_timestamp_takes_its_element_time():
    # The element time is the publish time, or --timestamp_attribute's value when given.
    messages = [
        PubsubMessage(b'{"name": "page view", "id": "a"}', {"ts": "x"}),
        PubsubMessage(b'{"name": "page view", "id": "b", "timestamp": 5}', {}),
    ]
    options = PipelineOptions([], runner="FnApiRunner")
    with test_pipeline.TestPipeline(options=options, runner="FnApiRunner") as p:
        events = (
            p
            | beam.Create(messages)
            | beam.Map(lambda m: TimestampedValue(m, 1_700_000_000.123))
            | beam.ParDo(ParseEventsAtElementTime({}, "f")).with_outputs("dead_letter", main="events")
        )
        assert_that(
            events.events | beam.Map(lambda e: (e["id"], e["timestamp"])),
            equal_to([("a", 1_700_000_000_123), ("b", 5)]),
        )


def test_without_an_element_time_a_pubsub_event_takes_its_publish_time():
    # Batch runs parse in PlanEvents, which does not ask Beam for the element time.
    import datetime as dt

    message = PubsubMessage(
        b'{"name": "page view", "id": "c", "user": {"session": "s"}}',
        {},
        publish_time=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    )
    plan = PlanEvents(make_spec(flow_document()))
    plan.setup()
    [[(_, calls)]] = list(plan.process([message]))
    event = calls.event
    assert event["timestamp"] == 1_767_225_600_000


def test_a_raising_function_makes_its_value_undefined_counted_and_logged_once(caplog):
    mapping = {
        "page": {"view": {"data": {"map": {"upper": {"fn": "$code:(event) => event.data.title.toUpperCase()"}}}}}
    }
    spec = make_spec(flow_document(mapping=mapping))
    events = [
        {
            "name": "page view",
            "id": f"{i:016x}",
            "timestamp": 1,
            "user": {"session": "s"},
            "data": {"title": 7 if i % 2 else "home"},
        }
        for i in range(6)
    ]
    with caplog.at_level(logging.WARNING):
        lines = list(explain_payloads(compiled(spec), events))
    assert [l["calls"][0]["properties"] for l in lines] == [{"upper": "HOME"}, {}] * 3
    assert compiled(spec).function_errors.counts == {
        "$.flows.default.destinations.segment.config.mapping.page.view.data.map.upper.fn": 3
    }
    assert len([r for r in caplog.records if "failed: TypeError" in r.getMessage()]) == 1

    options = PipelineOptions([], runner="FnApiRunner")
    p = test_pipeline.TestPipeline(options=options, runner="FnApiRunner")
    from pipeline.graph import build_pipeline
    from segment_api.connection import SendOptions

    spec_off = make_spec(flow_document(mapping=mapping, settings={"disable": True}))
    build_pipeline(p, spec_off, streaming=False, read=beam.Create(events), send_options=SendOptions(flush_deadline_s=5))
    result = p.run()
    result.wait_until_finish()
    assert counters(result)["mapping_function_errors"] == 3
