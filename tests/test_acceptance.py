"""walkerOS's own Segment destination examples (tests/data/acceptance/acceptance.json), each run
through explain and through the Beam pipeline against the local endpoint: the same calls both
ways, and equal to the vector. messageIds are checked for stability and uniqueness separately."""

import pytest
from support import comparable, flow_document, load_json, make_spec, run_pipeline

from decide.destination import DELIVERED, compiled
from pipeline.explain import explain_payloads

VECTORS = load_json("acceptance/acceptance.json")["cases"]


def case_spec(case, host="http://127.0.0.1:9"):
    return make_spec(flow_document(settings=case["settings"], mapping=case["mapping"], host=host))


def expected_outcomes(case):
    return case.get("outcomes") or [DELIVERED] * len(case["events"])


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_explain_gives_the_vector(case):
    lines = list(explain_payloads(compiled(case_spec(case)), case["events"]))
    assert [l["outcome"] for l in lines] == expected_outcomes(case)
    assert [[comparable(c) for c in l["calls"]] for l in lines] == [
        [comparable(c) for c in calls] for calls in case["calls"]
    ]


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_pipeline_sends_the_vector(case, endpoint):
    run_pipeline(case_spec(case, endpoint.url), case["events"])
    by_event: dict[str, list] = {}
    for message in endpoint.accepted:
        by_event.setdefault(message["messageId"].split(":")[1], []).append(comparable(message))
    expected = {e["id"]: [comparable(c) for c in calls] for e, calls in zip(case["events"], case["calls"]) if calls}
    assert by_event == expected


def test_message_ids_are_stable_unique_and_per_call_type():
    ids = []
    for case in VECTORS:
        first = list(explain_payloads(compiled(case_spec(case)), case["events"]))
        again = list(explain_payloads(compiled(case_spec(case)), case["events"]))
        assert [[c["messageId"] for c in l["calls"]] for l in first] == [
            [c["messageId"] for c in l["calls"]] for l in again
        ]
        ids += [c["messageId"] for l in first for c in l["calls"]]
    assert len(ids) == len(set(ids)) and all(0 < len(i) <= 100 for i in ids)
    assert all(i.startswith("test:") for i in ids)
