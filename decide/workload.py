"""A representative workload of the decide layer, which setup.py trains the C compiler on.

The compiled modules are built twice: once instrumented, then, after this workload ran on them,
again with the profile it recorded (GCC's profile-guided optimisation, as CPython's own release
builds are made). The compiler then lays out the code every event runs together and predicts
its branches from how they went, which takes more time off than it takes instructions.

The workload is its own: a flow with every kind of call (identify, group, page, track), consent,
a loop, a condition and functions in JavaScript and Python, and events of a shop, run through
the steps as the batch pipeline, the streaming pipeline and explain call them, then to the wire
form. Not the benchmark's flow or events (that would tune the build to what measures it). What
it does not run, the compiler keeps compact; nothing in it changes any answer.

    python -c 'import decide.workload; decide.workload.main()'
"""

from __future__ import annotations

import sys

import orjson

from decide.calls import EventCalls
from decide.destination import Destination, DestinationSpec, Outcome
from decide.event import parse_payload
from decide.flow import flow_from_document
from decide.functions import FunctionPolicy
from decide.wire import EventMessages, split_batches

_PRODUCT = {"map": {"product_id": "data.id", "name": "data.name", "price": "data.price"}}
_SETTINGS = {
    "writeKey": "training-key",
    "host": "http://127.0.0.1:9",
    "userId": "user.id",
    "anonymousId": "user.session",
    "consent": {"analytics": "Analytics", "marketing": "Advertising"},
    "identify": {"map": {"traits": {"map": {"email": "user.email", "plan": "user.plan"}}}},
    "group": {"map": {"groupId": "globals.account", "traits": {"map": {"name": "globals.team"}}}},
    "integrations": {"All": True},
}
_PAGE = {"map": {"name": "data.title", "category": "globals.section", "properties": {"map": {"path": "data.id"}}}}
_ORDER = {
    "map": {
        "order_id": "data.id",
        "revenue": "data.total",
        "large": "$py:lambda value, context: (value['data'].get('total') or 0) > 100",
        "products": {
            "loop": ["nested", {"condition": "$code:(entity) => entity.entity === 'product'", "map": _PRODUCT["map"]}]
        },
    }
}
_MAPPING = {
    "page": {"view": {"silent": True, "settings": {"page": _PAGE}}},
    "product": {
        "view": {"name": "Product Viewed", "data": _PRODUCT},
        "add": {
            "name": "Product Added",
            "data": {"map": {**_PRODUCT["map"], "quantity": {"key": "data.qty", "value": 1}}},
        },
    },
    "order": {"complete": {"name": "Order Completed", "data": _ORDER}},
    "user": {"login": {"silent": True, "settings": {"identify": {"map": {"userId": "data.user"}}}}},
    "debug": {"*": {"ignore": True}},
}
_FLOW = {
    "version": 4,
    "flows": {
        "training": {
            "collector": {"globals": {"environment": "training"}},
            "destinations": {
                "segment": {
                    "package": "@walkeros/server-destination-segment",
                    "config": {"consent": {"analytics": True}, "settings": _SETTINGS, "mapping": _MAPPING},
                }
            },
        }
    },
}
_NAMES = ("page view", "page view", "product view", "product view", "product add", "order complete", "user login")


def _event(i: int) -> bytes:
    """The i-th event: a few hundred users, a shop's mix of events, some consent denied."""
    user = i % 397
    name = "debug ping" if i % 101 == 0 else _NAMES[i % len(_NAMES)]
    event: dict = {
        "name": name,
        "id": f"t{i:08x}",
        "timestamp": 1_767_225_600_000 + i * 37,
        "user": {"session": f"s{user}", "email": f"u{user}@example.com", "plan": ("free", "pro")[user % 2]},
        "globals": {"section": ("home", "cart")[i % 2], "account": f"a{user % 31}", "team": f"Team {user % 31}"},
        "consent": {"analytics": i % 13 != 0, "marketing": i % 3 == 0},
        "data": {"id": f"p{i % 89}", "name": f"Product {i % 89}", "price": 9.5 + i % 40, "title": "Shop"},
    }
    if user % 4 == 0:
        event["user"]["id"] = f"user-{user}"
    if name == "order complete":
        event["data"] = {"id": f"o{i}", "total": 20.0 + i % 300}
        products = [{"entity": "product", "data": {"id": f"p{n}", "price": 5.0 + n}} for n in range(i % 4)]
        event["nested"] = [*products, {"entity": "promotion", "data": {"id": "spring"}}]
    if name == "user login":
        event["data"] = {"user": f"user-{user}"}
    if i % 211 == 0:
        del event["id"]  # an id derived from the content
    return orjson.dumps(event)


def run(events: int = 20_000) -> dict[str, int]:
    """The workload; what came of it, by kind (so a run that did nothing shows)."""
    flow = flow_from_document(_FLOW, env={})
    spec = DestinationSpec.from_flow(flow, functions=FunctionPolicy(allow_python=True))
    destination = Destination(spec)
    lines = [_event(i) for i in range(events)]
    lines.append(b'{"name": "page view", "timestamp": "yesterday"}')  # dead letters take a turn too
    tally: dict[str, int] = {}
    states: dict = {}
    deliveries = []
    for index, line in enumerate(lines):
        for item in parse_payload(line, collector=spec.collector, flow=spec.flow_name):
            if not isinstance(item, dict):
                kind = "dead_letter"
            elif index % 2:  # batch and explain: every step up to deduplication at once
                planned = destination.before_deduplication(item)
                if isinstance(planned, EventCalls):
                    messages, states[planned.key], _ = destination.deduplicate(planned, states.get(planned.key))
                    deliveries.append(EventMessages(planned.event, messages))
                    kind = "delivered"
                else:
                    kind = planned.outcome
            else:  # streaming: one step at a time
                kind = _stepwise(destination, item, states, deliveries)
            tally[kind] = tally.get(kind, 0) + 1
    for delivery in deliveries:
        for message in delivery.messages:
            tally[message["type"]] = tally.get(message["type"], 0) + 1
    # Cutting requests encodes each event's messages in their wire form.
    tally["batches"] = sum(1 for _ in split_batches(deliveries, 100))
    return tally


def _stepwise(destination: Destination, event: dict, states: dict, deliveries: list) -> str:
    mapped = destination.mapped_or_outcome(event)
    if isinstance(mapped, Outcome):
        return mapped.outcome
    destination.decision_inputs(mapped)
    planned = destination.plan(mapped)
    if not isinstance(planned, EventCalls):
        return "no_identity"
    messages, states[planned.key], _ = destination.deduplicate(planned, states.get(planned.key))
    deliveries.append(EventMessages(planned.event, messages))
    return "delivered"


def main() -> None:
    print(orjson.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)).decode())


if __name__ == "__main__":
    main()
