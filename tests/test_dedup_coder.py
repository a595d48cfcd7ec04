"""encode_calls / decode_calls: what the batch shuffle (GroupByUser) carries comes out as it went in."""
from __future__ import annotations

import datetime as dt

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.graph import build_pipeline
from support import flow_document, make_spec
from transforms.calls import EventCalls
from transforms.dedup import decode_calls, encode_calls

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)
_MESSAGE = st.dictionaries(st.text(max_size=5), _JSON, max_size=4)
_SIGNATURE = st.none() | st.tuples(st.text(max_size=6), st.text(max_size=6))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _JSON, max_size=5), st.text(max_size=8), st.integers(0, 2**53),
       st.none() | _MESSAGE, _SIGNATURE, st.none() | _MESSAGE, _SIGNATURE, st.lists(_MESSAGE, max_size=3))
def test_json_values_round_trip_exactly(event, key, ts, identify, id_sig, group, group_sig, others):
    calls = EventCalls(event, key, ts, identify, id_sig, group, group_sig, others)
    encoded = encode_calls(calls)
    assert encoded[:1] == b"j"  # the fast path
    assert decode_calls(encoded) == calls


def test_what_json_cannot_hold_is_pickled_and_kept():
    odd = {"when": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), 2: "int key", "tags": {"a"}, "big": 2**80}
    calls = EventCalls({"id": "1"}, "k", 1, None, None, None, None, [{"type": "track", "properties": odd}])
    encoded = encode_calls(calls)
    assert encoded[:1] == b"p" and decode_calls(encoded) == calls


def test_the_batch_shuffle_carries_bytes():
    """The FnApiRunner's grouping buffer holds decoded values: bytes hold a fraction of the memory."""
    from apache_beam.coders import coders

    spec = make_spec(flow_document(settings={"disable": True, "identify": {"map": {"traits": {"map": {
        "email": "user.email"}}}}}))
    p = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([]))
    build_pipeline(p, spec, streaming=False, read=beam.Create([]))
    proto, context = p.to_runner_api(return_context=True)
    [group] = [t for t in proto.components.transforms.values() if t.unique_name.endswith("GroupByUser")]
    [input_id] = group.inputs.values()
    coder = context.coders.get_by_id(proto.components.pcollections[input_id].coder_id)
    assert isinstance(coder.value_coder(), coders.BytesCoder), coder
