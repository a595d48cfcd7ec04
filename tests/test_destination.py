"""The Segment destination's rules (SPEC 4): identity, the five calls, consent, integrations,
and identify/group only on change, per user. Run through explain's functions; the pipeline is
checked to agree on a multi-user scenario."""

import json
import random

import pytest
from support import comparable, flow_document, make_spec, run_pipeline

from decide.destination import compiled
from pipeline.explain import explain_payloads

T0 = 1_700_000_000_000


def event(name="product view", user=None, n=0, **fields):
    return {
        "name": name,
        "id": f"{n:016x}",
        "timestamp": T0 + n * 1000,
        "user": user if user is not None else {"id": "u1", "session": "s1"},
        **fields,
    }


def explain(events, settings=None, mapping=None, **config):
    spec = make_spec(flow_document(settings=settings, mapping=mapping, **config))
    return list(explain_payloads(compiled(spec), events))


def types(lines):
    return [[c["type"] for c in l["calls"]] for l in lines]


IDENTIFY_EMAIL = {"identify": {"map": {"traits": {"map": {"email": "user.email"}}}}}


# -- identity ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "user, expected",
    [
        ({"id": "u1", "session": "s1"}, {"userId": "u1", "anonymousId": "s1"}),
        ({"session": "s1"}, {"anonymousId": "s1"}),
        ({"id": "u1"}, {"userId": "u1"}),
        ({"id": 42, "session": "s1"}, {"anonymousId": "s1"}),  # numbers are not ids
        ({"id": "", "session": "s1"}, {"anonymousId": "s1"}),  # nor empty strings
    ],
)
def test_identity_fields(user, expected):
    [line] = explain([event(user=user)])
    [track] = line["calls"]
    assert {k: track[k] for k in ("userId", "anonymousId") if k in track} == expected


@pytest.mark.parametrize("user", [{}, {"id": 42}, {"id": "", "session": ""}, {"device": "d1"}])
def test_no_identity_is_a_dead_letter(user):
    [line] = explain([event(user=user)])
    assert (line["outcome"], line["reason"], line["calls"]) == ("dead_letter", "no_identity", [])


def test_identity_paths_are_mapping_values():
    [line] = explain(
        [event(user={"device": "d1"}, data={"customer": "c9"})],
        settings={"userId": "data.customer", "anonymousId": ["user.session", "user.device"]},
    )
    assert {k: line["calls"][0][k] for k in ("userId", "anonymousId")} == {"userId": "c9", "anonymousId": "d1"}


# -- identify / group only on change ---------------------------------------------------------
def test_interleaved_users_get_one_identify_each():
    a, b = {"id": "A", "session": "sa"}, {"id": "B", "session": "sb"}
    lines = explain(
        [event(user=a, n=1), event(user=b, n=2), event(user=a, n=3)],
        settings={"identify": {"map": {"userId": "user.id"}}},
    )
    assert types(lines) == [["identify", "track"], ["identify", "track"], ["track"]]


def test_traits_key_order_does_not_matter():
    def identify(*keys):
        return {"settings": {"identify": {"map": {"traits": {"map": {k: f"data.{k}" for k in keys}}}}}}

    mapping = {"x": {"a": identify("a", "b")}, "y": {"b": identify("b", "a")}}
    lines = explain(
        [event("x a", n=1, data={"a": 1, "b": 2}), event("y b", n=2, data={"a": 1, "b": 2})], mapping=mapping
    )
    assert types(lines) == [["identify", "track"], ["track"]]


def test_changed_traits_fire_again():
    lines = explain(
        [
            event(n=1, user={"id": "u1", "session": "s1", "email": "a@x"}),
            event(n=2, user={"id": "u1", "session": "s1", "email": "a@x"}),
            event(n=3, user={"id": "u1", "session": "s1", "email": "b@x"}),
        ],
        settings=IDENTIFY_EMAIL,
    )
    assert types(lines) == [["identify", "track"], ["track"], ["identify", "track"]]
    assert lines[2]["calls"][0]["traits"] == {"email": "b@x"}


def test_anonymous_users_with_and_without_traits():
    anon = {"session": "s1"}
    # traits resolving to an object (even {}) fire once; no traits at all never fire
    with_traits = explain(
        [event(user=anon, n=1), event(user=anon, n=2)],
        settings={"identify": {"map": {"traits": {"map": {"email": "user.email"}}}}},
    )
    assert types(with_traits) == [["identify", "track"], ["track"]]
    assert with_traits[0]["calls"][0]["traits"] == {} and "userId" not in with_traits[0]["calls"][0]
    without = explain(
        [event(user=anon, n=1), event(user=anon, n=2)], settings={"identify": {"map": {"userId": "user.id"}}}
    )
    assert types(without) == [["track"], ["track"]]


def test_login_changes_the_user_id_within_one_session():
    mapping = {"user": {"login": {"silent": True, "settings": {"identify": {"map": {"userId": "data.id"}}}}}}
    anon = {"session": "s1"}
    lines = explain(
        [
            event("page view", user=anon, n=1),
            event("user login", user=anon, n=2, data={"id": "real-1"}),
            event("page view", user={"id": "real-1", "session": "s1"}, n=3),
            event("page view", user={"id": "real-1", "session": "s1"}, n=4),
        ],
        settings={"identify": {"map": {"userId": "user.id"}}},
        mapping=mapping,
    )
    assert types(lines) == [["track"], ["identify"], ["track"], ["track"]]
    assert lines[1]["calls"][0]["userId"] == "real-1" and lines[1]["calls"][0]["anonymousId"] == "s1"


def test_rule_identify_replaces_destination_identify():
    mapping = {"user": {"login": {"settings": {"identify": {"map": {"traits": {"map": {"plan": "data.plan"}}}}}}}}
    lines = explain(
        [
            event("user login", n=1, data={"plan": "pro"}, user={"id": "u1", "session": "s1", "email": "e"}),
            event("page view", n=2, user={"id": "u1", "session": "s1", "email": "e"}),
        ],
        settings=IDENTIFY_EMAIL,
        mapping=mapping,
    )
    assert [c.get("traits") for c in lines[0]["calls"]] == [{"plan": "pro"}, None]
    assert lines[1]["calls"][0]["traits"] == {"email": "e"}  # the destination's identify differs: fires


def test_group_fires_on_change_only():
    mapping = {
        "company": {
            "update": {
                "silent": True,
                "settings": {"group": {"map": {"groupId": "data.company", "traits": {"map": {"name": "data.name"}}}}},
            }
        }
    }
    lines = explain(
        [
            event("company update", n=1, data={"company": "acme", "name": "Acme"}),
            event("company update", n=2, data={"company": "acme", "name": "Acme"}),
            event("company update", n=3, data={"name": "Nobody"}),
            event("company update", n=4, data={"company": "beta", "name": "Beta"}),
            event("company update", n=5, data={"company": "beta", "name": "Beta Inc"}),
        ],
        mapping=mapping,
    )
    assert types(lines) == [["group"], [], [], ["group"], ["group"]]
    assert [l["outcome"] for l in lines] == ["delivered"] * 5
    assert lines[3]["calls"][0]["groupId"] == "beta" and lines[4]["calls"][0]["traits"] == {"name": "Beta Inc"}


def test_destination_group_uses_identity_not_identify_override():
    settings = {"group": {"map": {"groupId": "globals.account"}}, "identify": {"map": {"userId": "data.uid"}}}
    [line] = explain([event(n=1, globals={"account": "acc-1"}, data={"uid": "other"})], settings=settings)
    identify, group, track = line["calls"]
    assert identify["userId"] == "other" and group["userId"] == "u1" and group["groupId"] == "acc-1"
    assert group["traits"] == {}


# -- page and screen -------------------------------------------------------------------------
def test_page_and_screen_true_and_mapped():
    mapping = {
        "page": {"view": {"settings": {"page": True}}},
        "screen": {
            "view": {
                "silent": True,
                "settings": {"screen": {"map": {"name": "data.title", "category": {"value": 7}, "properties": "data"}}},
            }
        },
        "app": {"start": {"silent": True, "settings": {"page": True, "screen": True}}},
    }
    lines = explain(
        [event("page view", n=1), event("screen view", n=2, data={"title": "Home", "x": 1}), event("app start", n=3)],
        mapping=mapping,
    )
    assert types(lines) == [["page", "track"], ["screen"], ["page", "screen"]]
    page = lines[0]["calls"][0]
    assert "name" not in page and "category" not in page and page["properties"] == {}
    screen = lines[1]["calls"][0]
    assert screen["name"] == "Home" and "category" not in screen  # a non-string category is left out
    assert screen["properties"] == {"title": "Home", "x": 1}


def test_a_page_mapping_resolving_to_a_string_gives_no_page_call():
    mapping = {"page": {"view": {"silent": True, "settings": {"page": "data.title"}}}}
    [line] = explain([event("page view", data={"title": "Home"})], mapping=mapping)
    assert line["calls"] == [] and line["outcome"] == "delivered"


def test_track_name_and_properties():
    mapping = {"order": {"complete": {"name": "Order Completed", "data": {"map": {"total": "data.total"}}}}}
    lines = explain(
        [event("order complete", n=1, data={"total": 5}), event("order cancel", n=2, data={"x": 1})], mapping=mapping
    )
    assert (lines[0]["calls"][0]["event"], lines[0]["calls"][0]["properties"]) == ("Order Completed", {"total": 5})
    assert (lines[1]["calls"][0]["event"], lines[1]["calls"][0]["properties"]) == ("order cancel", {})


# -- consent -----------------------------------------------------------------------------------
def test_consent_true_and_false_are_forwarded():
    settings = {"consent": {"analytics": "Analytics", "marketing": "Advertising", "absent": "Other"}}
    [line] = explain([event(consent={"analytics": True, "marketing": False})], settings=settings)
    assert line["calls"][0]["context"] == {
        "consent": {"categoryPreferences": {"Analytics": True, "Advertising": False}}
    }
    [line] = explain([event(consent={"functional": True})], settings=settings)
    assert "context" not in line["calls"][0]


def test_the_mapping_reads_only_granted_consent_as_walkeros_hands_it_over():
    # walkerOS's collector reduces an event's consent to the granted keys before its destination
    # maps it: a denied key reads as undefined, in data, in functions and in identify mappings;
    # categoryPreferences still forwards true and false.
    settings = {
        "consent": {"analytics": "Analytics", "marketing": "Advertising"},
        "identify": {"map": {"traits": {"map": {"ads": "consent.marketing", "stats": "consent.analytics"}}}},
    }
    mapping = {
        "product": {
            "view": {
                "data": {
                    "map": {
                        "marketing": {"key": "consent.marketing", "value": "undefined"},
                        "analytics": "consent.analytics",
                        "all": "consent",
                        "seen": {"fn": "$code:(event, context) => Object.keys(context.consent).join()"},
                    }
                }
            }
        }
    }
    [line] = explain([event(consent={"analytics": True, "marketing": False})], settings=settings, mapping=mapping)
    identify, track = line["calls"]
    assert track["properties"] == {
        "marketing": "undefined",
        "analytics": True,
        "all": {"analytics": True},
        "seen": "analytics",
    }
    assert identify["traits"] == {"stats": True}
    assert track["context"]["consent"]["categoryPreferences"] == {"Analytics": True, "Advertising": False}


def test_collector_consent_is_the_base_state():
    settings = {"consent": {"analytics": "Analytics", "marketing": "Advertising"}}
    [line] = explain(
        [event(consent={"marketing": True})],
        settings=settings,
        collector={"consent": {"analytics": True, "marketing": False}},
    )
    assert line["calls"][0]["context"]["consent"]["categoryPreferences"] == {"Analytics": True, "Advertising": True}


def test_destination_consent_gate():
    lines = explain(
        [
            event(n=1, consent={"analytics": True}),
            event(n=2, consent={"analytics": False}),
            event(n=3, consent={}),
            event(n=4, consent={"marketing": True}),
        ],
        consent={"analytics": True, "marketing": True},
    )
    assert [(l["outcome"], l["reason"]) for l in lines] == [
        ("delivered", None),
        ("consent_denied", "destination_consent"),
        ("consent_denied", "destination_consent"),
        ("delivered", None),
    ]


def test_rule_consent_gate_is_enforced():
    mapping = {"order": {"complete": {"consent": {"marketing": True}, "name": "Order Completed"}}}
    lines = explain(
        [
            event("order complete", n=1, consent={"marketing": True}),
            event("order complete", n=2, consent={"analytics": True}),
            event("product view", n=3, consent={"analytics": True}),
        ],
        mapping=mapping,
    )
    assert [(l["outcome"], l["reason"]) for l in lines] == [
        ("delivered", None),
        ("consent_denied", "rule_consent"),
        ("delivered", None),
    ]


# -- integrations ----------------------------------------------------------------------------
def test_integrations_go_on_every_call():
    settings = {"integrations": {"All": True, "Mixpanel": False}, **IDENTIFY_EMAIL}
    [line] = explain([event(user={"id": "u", "session": "s", "email": "e"})], settings=settings)
    assert [c["integrations"] for c in line["calls"]] == [{"All": True, "Mixpanel": False}] * 2
    [line] = explain([event()])
    assert "integrations" not in line["calls"][0]


# -- the pipeline agrees, in any input order -------------------------------------------------
def scenario():
    users = [{"id": f"u{i}", "session": f"s{i}", "email": f"u{i}@x"} for i in range(4)]
    events = []
    for n in range(40):
        user = dict(users[n % 4])
        if n == 21:
            user["email"] = "changed@x"
        events.append(event("page view" if n % 3 else "product view", user=user, n=n))
    return events


SCENARIO_SETTINGS = {**IDENTIFY_EMAIL, "group": {"map": {"groupId": {"value": "team"}}}}
SCENARIO_MAPPING = {"page": {"view": {"silent": True, "settings": {"page": True}}}}


def test_batch_pipeline_equals_explain_and_ignores_input_order(endpoint):
    events = scenario()
    spec = make_spec(flow_document(settings=SCENARIO_SETTINGS, mapping=SCENARIO_MAPPING, host=endpoint.url))
    explained = sorted(
        (c for l in explain_payloads(compiled(spec), events) for c in l["calls"]), key=lambda c: c["messageId"]
    )
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    run_pipeline(spec, shuffled)
    received = sorted(
        (comparable(m) | {"messageId": m["messageId"]} for m in endpoint.accepted), key=lambda c: c["messageId"]
    )
    assert received == [comparable(c) | {"messageId": c["messageId"]} for c in explained]
    kinds = [c["type"] for c in explained]
    # one each; u1's changed email fires, and so does its return to the old email afterwards
    assert kinds.count("identify") == 6 and kinds.count("group") == 4


def test_explain_decides_identify_and_group_in_event_time_order_whatever_the_input_order():
    # As a batch run does (transforms.dedup): each user's events by event time, then the event's digest.
    events = scenario()
    spec = make_spec(flow_document(settings=SCENARIO_SETTINGS, mapping=SCENARIO_MAPPING))

    def calls_by_event(payloads):
        return {line["id"]: line["calls"] for line in explain_payloads(compiled(spec), payloads)}

    in_order = calls_by_event(events)
    for seed in (1, 2):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        lines = list(explain_payloads(compiled(spec), shuffled))
        assert [l["id"] for l in lines] == [e["id"] for e in shuffled]  # lines stay in input order
        assert {l["id"]: l["calls"] for l in lines} == in_order
    assert calls_by_event(events[::-1]) == in_order


def test_batch_pipeline_equals_explain_when_a_users_events_share_a_millisecond(endpoint):
    # Ties in event time are taken in the same order by both (the event's digest, decide.identity).
    events = [{**e, "timestamp": 1767225600000} for e in scenario()]
    spec = make_spec(flow_document(settings=SCENARIO_SETTINGS, mapping=SCENARIO_MAPPING, host=endpoint.url))
    explained = sorted(
        (c for l in explain_payloads(compiled(spec), events) for c in l["calls"]), key=lambda c: c["messageId"]
    )
    run_pipeline(spec, events[::-1])
    received = sorted(
        (comparable(m) | {"messageId": m["messageId"]} for m in endpoint.accepted), key=lambda c: c["messageId"]
    )
    assert received == [comparable(c) | {"messageId": c["messageId"]} for c in explained]


@pytest.mark.parametrize("python_functions", [False, True])
def test_the_fused_steps_give_what_the_steps_one_by_one_give(tmp_path, python_functions: bool) -> None:
    """Batch runs and explain take every step up to deduplication in one go
    (``before_deduplication``); streaming takes them one by one as its named steps. On the
    benchmark's flow and events (consent mixes, conditions, loops, identify and group, a few
    invalid lines), with its functions in JavaScript and in Python, both give the same outcome,
    calls and signatures for every event."""
    import json

    from bench.generate import write_events, write_flow
    from decide.calls import EventCalls
    from decide.dead_letter import DeadLetter
    from decide.destination import CONSENT_DENIED, IGNORED, DestinationSpec
    from decide.event import parse_payload
    from decide.flow import flow_from_document
    from decide.functions import FunctionPolicy

    path = tmp_path / "events.jsonl"
    write_events(path, 3_000, 13)
    document = json.loads(write_flow(tmp_path / "flow.json", 500, python_functions=python_functions).read_text())
    spec = DestinationSpec.from_flow(
        flow_from_document(document, env={}),
        functions=FunctionPolicy(allow_python=python_functions),
    )
    destination = compiled(spec)

    def one_by_one(event: dict):
        if not destination.consent_granted(event):
            return (CONSENT_DENIED, "destination_consent")
        result = destination.mapping_result(event)
        if result.ignored:
            return (IGNORED, "ignore_rule")
        if not destination.rule_consent_granted(result):
            return (CONSENT_DENIED, "rule_consent")
        planned = destination.plan(destination.to_mapped(result, event))
        return ("dead_letter", planned.reason, planned.payload) if isinstance(planned, DeadLetter) else planned

    def fused(event: dict):
        planned = destination.before_deduplication(event)
        if isinstance(planned, EventCalls):
            return planned
        if planned.dead_letter is not None:
            return ("dead_letter", planned.reason, planned.dead_letter.payload)
        return (planned.outcome, planned.reason)

    outcomes: dict[str, int] = {}
    for line in path.read_bytes().splitlines():
        for event in parse_payload(line, collector=spec.collector, flow=spec.flow_name):
            if isinstance(event, DeadLetter):
                continue
            expected, got = one_by_one(json.loads(json.dumps(event))), fused(json.loads(json.dumps(event)))
            assert got == expected
            kind = "calls" if isinstance(got, EventCalls) else got[0]
            outcomes[kind] = outcomes.get(kind, 0) + 1
    # the events reach every outcome the fused path can give
    assert outcomes.get("calls", 0) > 2_000 and outcomes.get(CONSENT_DENIED, 0) > 100
    assert outcomes.get(IGNORED, 0) > 0


def test_a_destination_and_its_call_builder_pickle_as_what_they_were_compiled_from():
    """Compiled, they are extension types holding closures: a pickled copy is compiled again
    from its spec (or the builder's settings) and answers as the original does."""
    import pickle

    from support import IDENTIFY

    from decide.destination import Destination
    from decide.event import normalise

    spec = make_spec(flow_document({"identify": IDENTIFY}, {"product": {"view": {"name": "Viewed", "data": "data"}}}))
    original = Destination(spec)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is Destination and copy is not original
    copy.calls = pickle.loads(pickle.dumps(original.calls))  # the copy builds with a pickled builder
    events = [
        normalise(
            {
                "name": "product view",
                "id": f"e{i}",
                "timestamp": 1000 + i,
                "data": {"n": i},
                "user": {"id": f"u{i % 2}"},
            }
        )
        for i in range(4)
    ]
    original_states: dict = {}
    copy_states: dict = {}
    for event in events:
        assert copy.process(dict(event), copy_states).calls == original.process(dict(event), original_states).calls
    assert [m["type"] for m in copy.process(dict(events[0]), {}).calls] == ["identify", "track"]


def test_the_calls_carry_the_event_as_received_so_their_dead_letters_replay_as_it_came() -> None:
    """A delivery dead letter's payload is the event its calls carry; a no_identity one, the
    event planning saw. Both must be the normalised event as received, not as the mapping
    renamed it (a rule's ``name``, a policy) or as planning reduced its consent to the granted
    keys: replayed, it must give the same messages, with the same categoryPreferences."""
    import copy

    from decide.calls import EventCalls
    from decide.dead_letter import DeadLetter, payload_text
    from decide.event import parse_payload

    spec = make_spec(
        flow_document(
            settings={"consent": {"analytics": "Analytics", "marketing": "Advertising"}},
            mapping={"product": {"view": {"name": "Product Viewed", "data": {"map": {"id": "data.id"}}}}},
            policy={"data.source": {"value": "policy"}},
        )
    )
    destination = compiled(spec)

    def parsed(payload: dict) -> dict:
        [normalised] = parse_payload(json.dumps(payload).encode(), collector=spec.collector, flow=spec.flow_name)
        return normalised

    received = parsed(event(data={"id": "p1"}, consent={"analytics": True, "marketing": False}))
    as_received = copy.deepcopy(received)
    fused = destination.before_deduplication(received)
    stepwise = destination.plan(destination.to_mapped(destination.mapping_result(received), received))
    assert isinstance(fused, EventCalls) and isinstance(stepwise, EventCalls)
    assert fused.event == stepwise.event == received == as_received
    [track] = fused.messages(identify=False, group=False)
    assert track["event"] == "Product Viewed"
    assert track["context"]["consent"]["categoryPreferences"] == {"Analytics": True, "Advertising": False}

    replayed = destination.before_deduplication(parsed(json.loads(payload_text(fused.event))))
    assert replayed.messages(identify=False, group=False) == [track]

    anonymous = parsed(event(user={}, data={"id": "p1"}, consent={"analytics": True, "marketing": False}))
    for dead in (
        destination.before_deduplication(anonymous).dead_letter,
        destination.plan(destination.to_mapped(destination.mapping_result(anonymous), anonymous)),
    ):
        assert isinstance(dead, DeadLetter) and json.loads(dead.payload) == anonymous
