"""Batch identify/group deduplication: decided on a small record per event (first read of the
input), looked up by each event (second read). Same decisions as taking each user's events one
by one in event-time order, in any input order; the shuffle carries bytes, never events."""

from __future__ import annotations

import random
from collections import defaultdict

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from hypothesis import given, settings
from hypothesis import strategies as st
from support import comparable, flow_document, make_spec, run_pipeline

from decide.calls import EventCalls
from decide.destination import compiled
from decide.identity import decide
from pipeline.explain import explain_payloads
from pipeline.graph import build_pipeline
from segment_api.connection import SendOptions
from transforms.dedup import BUCKETS, decide_records, decision_record, event_digest, fire_key, signature_digest

T0 = 1_700_000_000_000
_SIGNATURES = st.sampled_from([None, ("", ""), ("u1", ""), ("u1", '{"email":"a"}'), ("", '{"email":"b"}')])
_GROUPS = st.sampled_from([None, ("g1", ""), ("g2", '{"name":"x"}')])


def _events(draw_list):
    """EventCalls from (user, time offset, identify signature, group signature)."""
    out = []
    for n, (user, offset, identify, group) in enumerate(draw_list):
        out.append(
            EventCalls(
                {"id": f"e{n}"},
                f"user-{user}",
                T0 + offset,
                {"type": "identify"} if identify is not None else None,
                identify,
                {"type": "group"} if group is not None else None,
                group,
                [],
            )
        )
    return out


def one_by_one(events, ttl_ms):
    """The reference: each user's events in event-time order through ``decide``."""
    fired = {}
    by_user = defaultdict(list)
    for calls in events:
        by_user[calls.key].append(calls)
    for calls_of_user in by_user.values():
        state = None
        for calls in sorted(calls_of_user, key=lambda c: c.timestamp_ms):
            fire_identify, fire_group, state = decide(
                state, calls.timestamp_ms, calls.identify_signature, calls.group_signature, ttl_ms
            )
            fired[calls.event["id"]] = (fire_identify, fire_group)
    return fired


def through_records(events, ttl_ms):
    """The batch path's functions: records per bucket, decided, then looked up per event."""
    buckets = defaultdict(bytearray)
    for calls in events:
        bucket, record = decision_record(
            calls.key, calls.timestamp_ms, calls.event["id"], calls.identify_signature, calls.group_signature
        )
        buckets[bucket] += record
    keys = set()
    for records in buckets.values():
        decided = decide_records(bytes(records), ttl_ms)
        assert len(decided) % 8 == 0
        keys.update(int.from_bytes(decided[i : i + 8], "little") for i in range(0, len(decided), 8))
    fired = {}
    for calls in events:
        event = event_digest(calls.key, calls.event["id"])
        fired[calls.event["id"]] = (
            calls.identify is not None and fire_key(event, signature_digest(calls.identify_signature), 0) in keys,
            calls.group is not None and fire_key(event, signature_digest(calls.group_signature), 1) in keys,
        )
    return fired


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 10_000), _SIGNATURES, _GROUPS),
        max_size=40,
        unique_by=lambda t: (t[0], t[1]),
    ),  # one event per user and millisecond: one order
    st.sampled_from([None, 1_000, 5_000]),
    st.randoms(use_true_random=False),
)
def test_records_decide_as_one_by_one_in_event_time_in_any_input_order(drawn, ttl_ms, rng):
    events = _events(drawn)
    expected = one_by_one(events, ttl_ms)
    rng.shuffle(events)
    assert through_records(events, ttl_ms) == expected


def test_a_record_is_forty_bytes_whatever_the_event_holds():
    big = {"id": "x" * 500, "data": {"blob": "y" * 10_000}}
    calls = EventCalls(
        big,
        "k" * 300,
        T0,
        {"type": "identify", "traits": {"t": "z" * 5000}},
        ("u" * 200, '{"t":"' + "z" * 5000 + '"}'),
        None,
        None,
        [{"type": "track"}] * 3,
    )
    bucket, record = decision_record(
        calls.key, calls.timestamp_ms, calls.event["id"], calls.identify_signature, calls.group_signature
    )
    assert 0 <= bucket < BUCKETS and len(record) == 40


def test_the_batch_shuffles_carry_only_bytes():
    """No GroupByKey of the batch graph carries events or their calls, only small bytes."""
    from apache_beam.coders import coders

    spec = make_spec(
        flow_document(settings={"disable": True, "identify": {"map": {"traits": {"map": {"email": "user.email"}}}}})
    )
    p = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([]))
    build_pipeline(p, spec, streaming=False, read=beam.Create([]))
    proto, context = p.to_runner_api(return_context=True)
    groups = [
        t
        for t in proto.components.transforms.values()
        if t.spec.urn == "beam:transform:group_by_key:v1" and "DeduplicateIdentity" not in t.unique_name
    ]
    decisions = [t for t in groups if "DecideIdentity" in t.unique_name]
    assert decisions, [t.unique_name for t in groups]
    for group in decisions:
        [input_id] = group.inputs.values()
        coder = context.coders.get_by_id(proto.components.pcollections[input_id].coder_id)
        assert isinstance(coder.value_coder(), coders.BytesCoder), (group.unique_name, coder)


EMAIL = {"identify": {"map": {"traits": {"map": {"email": "user.email"}}}}}


def _page(n, user, email, **fields):
    return {
        "name": "page view",
        "id": f"{n:016x}",
        "timestamp": T0 + n * 1000,
        "user": {"id": user, "session": f"s-{user}", "email": email},
        **fields,
    }


def test_an_event_without_a_timestamp_gets_its_identify_although_each_read_stamps_it_anew(endpoint):
    """A batch event without a timestamp is stamped with the time it is read, so the two reads
    see two times; its decision is found by user and id, not time."""
    spec = make_spec(flow_document(settings=EMAIL, host=endpoint.url))
    event = _page(1, "u1", "a@x")
    del event["timestamp"]
    result = run_pipeline(spec, [event])
    assert result.delivered == [event["id"]] and result.dead == []
    assert sorted(m["type"] for m in endpoint.accepted) == ["identify", "track"]


def test_copies_of_an_event_share_its_decision_and_segment_keeps_one(endpoint):
    """The same event twice (same user, id and traits): both copies carry the identify with one
    messageId, as they carry one track messageId, so what Segment keeps is what explain shows."""
    spec = make_spec(flow_document(settings=EMAIL, host=endpoint.url))
    events = [_page(1, "u1", "a@x"), _page(2, "u1", "a@x"), _page(1, "u1", "a@x"), _page(3, "u1", "b@x")]
    explained = {c["messageId"]: comparable(c) for l in explain_payloads(compiled(spec), events) for c in l["calls"]}
    run_pipeline(spec, list(reversed(events)))
    assert {m["messageId"]: comparable(m) for m in endpoint.accepted} == explained
    assert [c["type"] for c in explained.values()].count("identify") == 2


def test_the_second_pass_counts_nothing_twice():
    """Every event is planned twice in batch; the counters (and function errors) count it once."""
    mapping = {
        "page": {"view": {"data": {"map": {"upper": {"fn": "$code:(event) => event.data.title.toUpperCase()"}}}}}
    }
    spec = make_spec(flow_document(mapping=mapping, settings={"disable": True, **EMAIL}))
    events = [_page(i, f"u{i % 2}", "a@x", data={"title": 7 if i % 2 else "home"}) for i in range(6)]
    events.append("not json")
    random.Random(3).shuffle(events)
    counts = run_pipeline(spec, events, options=SendOptions(flush_deadline_s=5)).counts
    assert counts["mapping_function_errors"] == 3
    assert counts["events_parsed"] == 6 and counts["inputs_read"] == 7
    assert counts["identify_suppressed"] == 4  # two users, each identified once


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1),
            st.integers(-(2**53), 2**53),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
        ),
        max_size=60,
    ),
    st.integers(1, 4),
)
def test_compressed_frames_give_back_the_records_sorted(rows, parts):
    """What crosses the shuffle compressed comes back as the same records (in user, time order)."""
    from transforms.dedup import _RECORD, pack_records, unpack_records

    raw = [_RECORD.pack(*row) for row in rows]
    frames = b"".join(pack_records(b"".join(raw[i::parts])) for i in range(parts))
    back = unpack_records(frames)
    assert sorted(_RECORD.iter_unpack(back)) == sorted(rows)


def test_a_streaming_graph_keeps_its_keyed_state_and_reads_once():
    """Streaming keeps ``PerKeyState`` under the same names (a running job's update needs them)."""
    spec = make_spec(flow_document(settings=EMAIL))
    p = beam.Pipeline(options=PipelineOptions([], streaming=True))
    build_pipeline(p, spec, streaming=True, read=beam.Create([]))
    names = {t.unique_name for t in p.to_runner_api().components.transforms.values()}
    assert {"DeduplicateIdentity/TypeKeys", "DeduplicateIdentity/PerKeyState"} <= names
    assert not any("Decide" in name or "ReadEventsToDecide" in name for name in names)


def test_what_the_decision_reads_is_what_the_calls_carry_on_a_realistic_flow(tmp_path):
    """The first read plans signatures only, without mapping the data: on the benchmark's flow
    and events (identify and group from destination and rule settings, consent, conditions,
    JavaScript functions) they agree with the calls."""
    import json

    from bench.generate import flow_document as bench_flow
    from bench.generate import write_events
    from decide.dead_letter import DeadLetter
    from decide.destination import DestinationSpec
    from decide.event import parse_payload
    from decide.flow import flow_from_document

    path = tmp_path / "events.jsonl"
    write_events(path, 3_000, 11)
    spec = DestinationSpec.from_flow(flow_from_document(json.loads(json.dumps(bench_flow(500))), env={}))
    destination = compiled(spec)
    assert not destination.decisions_need_data
    compared = with_group = 0
    for line in path.read_bytes().splitlines():
        for event in parse_payload(line, collector=spec.collector, flow=spec.flow_name):
            if isinstance(event, DeadLetter) or not destination.consent_granted(event):
                continue
            result = destination.mapping_result(event)
            if result.ignored or not destination.rule_consent_granted(result):
                continue
            mapped = destination.to_mapped(result, event)
            calls, inputs = destination.plan(mapped), destination.decision_inputs(mapped)
            assert destination.decision_inputs(destination.mapped_or_outcome(event, with_data=False)) == inputs
            if isinstance(calls, DeadLetter):
                assert inputs is None
                continue
            assert tuple(inputs) == (
                calls.key,
                calls.timestamp_ms,
                calls.event["id"],
                calls.identify_signature,
                calls.group_signature,
            )
            compared += 1
            with_group += calls.group_signature is not None
    assert compared > 2_000 and with_group > 100


def _identify_flow_with(data_fn: str, allow_python: bool = False):
    from decide.destination import DestinationSpec
    from decide.functions import FunctionPolicy
    from decide.secrets import WriteKey
    from decide.settings import SegmentSettings

    # Identity read by functions too: they see the event as JavaScript functions share it.
    config = {
        "settings": {
            "userId": {"key": "user.id", "validate": "$code:(id, context) => context.event.user.id === id"},
            "anonymousId": "user.session",
            "identify": {"map": {"traits": {"map": {"plan": {"fn": "$code:(event) => event.globals.plan"}}}}},
        },
        "mapping": {"*": {"*": {"data": {"map": {"changed": {"fn": data_fn}}}}}},
    }
    settings = SegmentSettings.from_config({"writeKey": "k", **config["settings"]}, WriteKey("k"))
    return compiled(
        DestinationSpec(
            flow_name="t",
            settings=settings,
            config=config,
            collector={},
            functions=FunctionPolicy(allow_python=allow_python),
        )
    )


EVENT = {
    "name": "page view",
    "entity": "page",
    "action": "view",
    "id": "e1",
    "timestamp": 1_767_225_600_000,
    "user": {"id": "u1", "session": "s1"},
    "globals": {"plan": "pro"},
    "consent": {},
    "data": {},
}


def test_a_data_function_that_changes_the_event_does_not_change_who_is_identified():
    """The calls are planned on the event as mapped: a JavaScript function of the data mapping
    that writes to its event changes nothing for identity, so the first read (no data mapped)
    and the second (data mapped) decide alike."""
    destination = _identify_flow_with(
        "$code:(value, context) => { context.event.user.id = 'someone else'; "
        "context.event.globals.plan = 'free'; return 'changed'; }"
    )
    assert not destination.decisions_need_data
    mapped = destination.mapped_or_outcome(dict(EVENT))
    assert mapped.data == {"changed": "changed"}
    calls = destination.plan(mapped)
    assert calls.key == "s1" and calls.identify["userId"] == "u1"
    assert calls.identify["traits"] == {"plan": "pro"}
    assert destination.decision_inputs(
        destination.mapped_or_outcome(dict(EVENT), with_data=False)
    ) == destination.decision_inputs(mapped)


def test_a_flow_with_python_functions_maps_the_data_before_deciding():
    """A `$py:` function gets the event's own objects and can change them in place: its flow's
    first read maps the data as the second does."""
    destination = _identify_flow_with("$py:lambda value, context: 'changed'", allow_python=True)
    assert destination.decisions_need_data
