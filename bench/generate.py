"""Synthetic walkerOS traffic and a realistic flow file, both deterministic (fixed seed).

The events are written line by line (JSON Lines), never held whole in memory, so 1,000,000 of
them cost the generator no more memory than 10,000. The mix imitates a shop's server-side
stream: many users, each with several sessions; page views dominate; product views, cart and
checkout steps, orders with nested products, logins and sign-ups (which identify the user),
B2B users with a company (which fires group), searches, promotions, app screens, a debug
event the flow ignores, events no rule names (the ``* *`` fallback), consent mixes (granted,
marketing denied, analytics denied, no consent at all), a few events without any identity
and a few invalid lines (not JSON, no name, wrong types).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson

SEED = 20260701
BASE_TIME_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# ---------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------

# Functions are JavaScript ("$code:"), as walkerOS users write them.
BIG_ORDER = "$code:(event) => ((event.data || {}).total || 0) >= 500"
IS_PRODUCT = "$code:(entity) => entity.entity === 'product'"
# In walkerOS a `key` beside `fn` replaces the function's result, and `fn` gets the event: the
# search term is read by the function itself.
LOWER = (
    "$code:(event) => { const term = (event.data || {}).term; "
    "return typeof term === 'string' ? term.trim().toLowerCase() : term; }"
)
# The same three as Python ("$py:", run with --allow_python_functions): the flow as it was when
# the transform's 37 µs target was set, so the transform is compared on the same work.
IN_PYTHON = {
    BIG_ORDER: "$py:lambda event, context: ((event.get('data') or {}).get('total') or 0) >= 500",
    IS_PRODUCT: "$py:lambda entity, context: entity.get('entity') == 'product'",
    LOWER: "$py:lambda event, context: (lambda term: term.strip().lower() if isinstance(term, str) else term)"
    "((event.get('data') or {}).get('term'))",
}

PRODUCT_ITEM = {
    "condition": IS_PRODUCT,
    "map": {
        "product_id": "data.id",
        "name": "data.name",
        "price": "data.price",
        "quantity": {"key": "data.quantity", "value": 1},
    },
}


def flow_document(flush_at: int) -> dict:
    """A flow with 17 rules: identify and group, consent forwarding, loops, conditional rules."""
    product = {
        "map": {
            "product_id": "data.id",
            "name": "data.name",
            "price": "data.price",
            "category": "data.category",
            "currency": {"key": "globals.currency", "value": "EUR"},
        }
    }
    mapping = {
        "page": {
            "view": {
                "silent": True,
                "settings": {
                    "page": {
                        "map": {
                            "name": "data.title",
                            "category": "globals.pagegroup",
                            "properties": {
                                "map": {
                                    "path": "data.id",
                                    "referrer": "data.referrer",
                                    "title": "data.title",
                                    "url": "source.url",
                                }
                            },
                        }
                    }
                },
            }
        },
        "product": {
            "view": {"name": "Product Viewed", "data": product},
            "add": {
                "name": "Product Added",
                "data": {"map": {**product["map"], "quantity": {"key": "data.quantity", "value": 1}}},
            },
            "remove": {"name": "Product Removed", "data": {"map": {"product_id": "data.id"}}},
        },
        "cart": {
            "view": {
                "name": "Cart Viewed",
                "data": {"map": {"value": "data.value", "products": {"loop": ["nested", PRODUCT_ITEM]}}},
            }
        },
        "checkout": {
            "start": {
                "name": "Checkout Started",
                "data": {
                    "map": {
                        "order_id": "data.id",
                        "value": "data.value",
                        "currency": "data.currency",
                        "products": {"loop": ["nested", PRODUCT_ITEM]},
                    }
                },
            }
        },
        "order": {
            "complete": [
                # conditional: big orders are flagged (first matching rule wins)
                {
                    "condition": BIG_ORDER,
                    "name": "Order Completed",
                    "data": {
                        "map": {
                            "order_id": "data.id",
                            "revenue": "data.total",
                            "currency": "data.currency",
                            "tier": {"value": "big"},
                            "products": {"loop": ["nested", PRODUCT_ITEM]},
                        }
                    },
                },
                {
                    "name": "Order Completed",
                    "data": {
                        "map": {
                            "order_id": "data.id",
                            "revenue": "data.total",
                            "currency": "data.currency",
                            "products": {"loop": ["nested", PRODUCT_ITEM]},
                        }
                    },
                },
            ]
        },
        "user": {
            "login": {
                "silent": True,
                "settings": {
                    "identify": {
                        "map": {
                            "userId": "data.user_id",
                            "traits": {"map": {"email": "data.email", "plan": "data.plan"}},
                        }
                    }
                },
            },
            "signup": {
                "name": "Signed Up",
                "consent": {"analytics": True},
                "data": {"map": {"method": "data.method", "plan": "data.plan"}},
                "settings": {
                    "identify": {
                        "map": {
                            "userId": "data.user_id",
                            "traits": {
                                "map": {"email": "data.email", "plan": "data.plan", "created_at": "data.created_at"}
                            },
                        }
                    }
                },
            },
        },
        "newsletter": {
            "subscribe": {
                "name": "Newsletter Subscribed",
                "consent": {"marketing": True},
                "data": {"map": {"list": "data.list"}},
            }
        },
        "search": {
            "submit": {
                "name": "Products Searched",
                "data": {"map": {"query": {"fn": LOWER}, "results": "data.results"}},
            }
        },
        "promotion": {
            "*": {
                "name": "Promotion Interacted",
                "data": {"map": {"promotion_id": "data.id", "creative": "data.creative", "position": "data.position"}},
                "include": ["globals"],
            }
        },
        "screen": {
            "view": {
                "silent": True,
                "settings": {
                    "screen": {"map": {"name": "data.name", "properties": {"map": {"app_version": "source.version"}}}}
                },
            }
        },
        "account": {
            "update": {
                "name": "Account Updated",
                "data": {"map": {"seats": "data.seats"}},
                "settings": {
                    "group": {
                        "map": {
                            "groupId": "data.company_id",
                            "traits": {"map": {"name": "data.company", "plan": "data.plan", "seats": "data.seats"}},
                        }
                    }
                },
            }
        },
        "debug": {"*": {"ignore": True}},
        "*": {
            "*": {
                "data": {"map": {"entity": "entity", "action": "action", "trigger": "trigger"}},
                "remove": ["trigger"],
            }
        },
    }
    config = {
        "consent": {"analytics": True},
        "settings": {
            "writeKey": "$env.BENCH_SEGMENT_WRITE_KEY:bench-write-key",
            "host": "$env.BENCH_SEGMENT_HOST:http://127.0.0.1:9",
            "flushAt": flush_at,
            "maxRetries": 3,
            "userId": "user.id",
            "anonymousId": "user.session",
            "consent": {"analytics": "Analytics", "marketing": "Advertising", "personalization": "Personalization"},
            "identify": {"map": {"traits": {"map": {"email": "user.email", "country": "user.country"}}}},
            "group": {"map": {"groupId": "globals.company_id", "traits": {"map": {"name": "globals.company"}}}},
            "integrations": {"All": True, "Mixpanel": False},
        },
        "mapping": mapping,
    }
    return {
        "version": 4,
        "flows": {
            "default": {
                "destinations": {"segment": {"package": "@walkeros/server-destination-segment", "config": config}},
                "collector": {"globals": {"environment": "production"}, "consent": {}},
            }
        },
    }


def rule_count(document: dict) -> int:
    mapping = document["flows"]["default"]["destinations"]["segment"]["config"]["mapping"]
    return sum(len(slot) if isinstance(slot, list) else 1 for actions in mapping.values() for slot in actions.values())


def write_flow(path: Path, flush_at: int, disable: bool = False, python_functions: bool = False) -> Path:
    """The bench flow; ``disable``: the same with ``settings.disable`` (everything but sending);
    ``python_functions``: its functions written in Python (:data:`IN_PYTHON`)."""
    document = flow_document(flush_at)
    if disable:
        for flow in document["flows"].values():
            for destination in flow.get("destinations", {}).values():
                destination["config"]["settings"]["disable"] = True
    text = json.dumps(document, indent=2)
    if python_functions:
        for javascript, python in IN_PYTHON.items():
            text = text.replace(json.dumps(javascript), json.dumps(python))
    path.write_text(text + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The events
# ---------------------------------------------------------------------------------------------

CATEGORIES = ("shoes", "bags", "jackets", "shirts", "hats", "socks", "outdoor", "kids")
PAGES = ("home", "category", "product", "cart", "checkout", "account", "blog", "help")
COUNTRIES = ("DE", "FR", "NL", "GB", "US", "ES", "IT", "PL", "SE", "AT")
PLANS = ("free", "plus", "pro")
TERMS = ("  Running Shoes", "rain JACKET ", "Backpack", "wool socks", "Trail  ", "gift card")

# (name, weight)
EVENT_MIX = (
    ("page view", 300),
    ("product view", 180),
    ("product add", 60),
    ("product remove", 15),
    ("cart view", 35),
    ("checkout start", 25),
    ("order complete", 22),
    ("user login", 30),
    ("user signup", 8),
    ("newsletter subscribe", 10),
    ("search submit", 60),
    ("promotion view", 35),
    ("promotion click", 12),
    ("screen view", 40),
    ("account update", 6),
    ("debug ping", 20),
    ("video play", 15),
    ("form submit", 12),
)
_NAMES = [name for name, _ in EVENT_MIX]
_WEIGHTS = [weight for _, weight in EVENT_MIX]
_CUM = []
_total = 0
for _w in _WEIGHTS:
    _total += _w
    _CUM.append(_total)


class _User:
    __slots__ = ("n", "device", "session", "session_no", "user_id", "email", "country", "company")

    def __init__(self, n: int, rng: random.Random):
        self.n = n
        self.device = f"d{n:07d}{rng.getrandbits(16):04x}"
        self.session_no = 0
        self.session = f"s{n:07d}-0"
        self.user_id = None
        self.email = None
        self.country = rng.choice(COUNTRIES)
        self.company = (
            (f"c{rng.randrange(2000):05d}", f"Company {rng.randrange(2000)}") if rng.random() < 0.12 else None
        )


class EventStream:
    """Deterministic synthetic events; ``lines(n)`` yields JSON Lines (bytes, no newline)."""

    def __init__(self, n: int, seed: int = SEED):
        self.n = n
        self.rng = random.Random(seed)
        # Many users: about one per 12 events, at least 50; their activity is skewed.
        self.users = [_User(i, self.rng) for i in range(max(50, n // 12))]
        self.time_ms = BASE_TIME_MS

    def _pick_user(self) -> _User:
        rng = self.rng
        # 70% of events from the first 30% of users (returning visitors), the rest uniform.
        if rng.random() < 0.7:
            return self.users[rng.randrange(max(1, int(len(self.users) * 0.3)))]
        return self.users[rng.randrange(len(self.users))]

    def _consent(self) -> dict | None:
        r = self.rng.random()
        if r < 0.60:
            return {"analytics": True, "marketing": True}
        if r < 0.80:
            return {"analytics": True, "marketing": False}
        if r < 0.87:
            return {"analytics": True, "marketing": False, "personalization": True}
        if r < 0.95:
            return {"analytics": False, "marketing": False}  # denied by the destination gate
        return None  # no consent at all: the collector's (empty) consent: denied too

    def _products(self, k: int) -> list[dict]:
        rng = self.rng
        out = []
        for _ in range(k):
            pid = rng.randrange(5000)
            out.append(
                {
                    "entity": "product",
                    "data": {
                        "id": f"p{pid:05d}",
                        "name": f"Product {pid}",
                        "price": round(rng.uniform(5, 400), 2),
                        "quantity": rng.randint(1, 3),
                        "category": CATEGORIES[pid % len(CATEGORIES)],
                    },
                }
            )
        if rng.random() < 0.2:  # a non-product entity in the basket (filtered by the loop's condition)
            out.append({"entity": "voucher", "data": {"id": f"v{rng.randrange(100)}", "value": 10}})
        return out

    def events(self):
        rng = self.rng
        for i in range(self.n):
            self.time_ms += rng.randint(20, 400)
            r = rng.random()
            if r < 0.004:
                yield self._invalid(i)
                continue
            user = self._pick_user()
            if rng.random() < 0.08:  # a new session now and then
                user.session_no += 1
                user.session = f"s{user.n:07d}-{user.session_no}"
            name = _NAMES[_bisect(rng.random() * _total)]
            event = self._event(name, user, i)
            if r < 0.007:  # no identity at all: dead-lettered as no_identity
                event["user"] = {"device": user.device}
            yield event

    def lines(self):
        for event in self.events():
            yield event if isinstance(event, bytes) else orjson.dumps(event)

    def _invalid(self, i: int):
        kind = i % 4
        if kind == 0:
            return b'{"name": "page view", "data": {"id": "/broken"'  # truncated JSON
        if kind == 1:
            return orjson.dumps({"data": {"id": "/no-name"}, "timestamp": self.time_ms})
        if kind == 2:
            return orjson.dumps({"name": "pageview", "timestamp": self.time_ms})  # one token
        return orjson.dumps({"name": "page view", "data": "not an object", "timestamp": self.time_ms})

    def _event(self, name: str, user: _User, i: int) -> dict:
        rng = self.rng
        entity, action = name.split(" ")
        data: dict = {}
        nested: list = []
        globals_ = {"pagegroup": rng.choice(PAGES), "currency": "EUR"}
        if user.company is not None:
            globals_["company_id"], globals_["company"] = user.company
        if entity == "page":
            page = rng.choice(PAGES)
            data = {
                "id": f"/{page}/{rng.randrange(300)}",
                "title": f"{page.title()} page",
                "referrer": rng.choice(("https://www.google.com/", "https://shop.example.com/", "")),
            }
        elif entity == "product":
            pid = rng.randrange(5000)
            data = {
                "id": f"p{pid:05d}",
                "name": f"Product {pid}",
                "price": round(rng.uniform(5, 400), 2),
                "category": CATEGORIES[pid % len(CATEGORIES)],
            }
            if action == "add":
                data["quantity"] = rng.randint(1, 3)
        elif entity in ("cart", "checkout", "order"):
            nested = self._products(rng.randint(1, 5))
            value = round(sum(p["data"].get("price", 0) * p["data"].get("quantity", 1) for p in nested), 2)
            data = {"id": f"o{i:08d}", "currency": "EUR"}
            data["total" if entity == "order" else "value"] = value
        elif entity == "user":
            if user.user_id is None:
                user.user_id = f"u{user.n:07d}"
                user.email = f"user{user.n}@example.com"
            data = {
                "user_id": user.user_id,
                "email": user.email,
                "plan": rng.choice(PLANS),
                "method": rng.choice(("password", "google", "apple")),
            }
            if action == "signup":
                data["created_at"] = self.time_ms
        elif entity == "newsletter":
            data = {"list": rng.choice(("weekly", "offers"))}
        elif entity == "search":
            data = {"term": rng.choice(TERMS), "results": rng.randrange(200)}
        elif entity == "promotion":
            data = {
                "id": f"promo{rng.randrange(40)}",
                "creative": rng.choice(("banner", "tile")),
                "position": rng.randrange(1, 6),
            }
        elif entity == "screen":
            data = {"name": rng.choice(("Home", "Product", "Cart", "Settings"))}
        elif entity == "account":
            company = user.company or (f"c{rng.randrange(2000):05d}", "Acme")
            data = {
                "company_id": company[0],
                "company": company[1],
                "plan": rng.choice(PLANS),
                "seats": rng.randint(1, 50),
            }
        elif entity == "debug":
            data = {"level": "info", "message": "heartbeat"}
        else:
            data = {"id": f"x{rng.randrange(1000)}"}

        u = {"session": user.session, "device": user.device, "country": user.country}
        if user.user_id is not None:
            u["id"] = user.user_id
            u["email"] = user.email
        event = {
            "name": name,
            "data": data,
            "globals": globals_,
            "user": u,
            "context": {"stage": [rng.choice(("browse", "checkout")), 1]},
            "timestamp": self.time_ms,
            "timing": round(rng.uniform(0, 30), 2),
            "trigger": rng.choice(("load", "click", "visible")),
            "source": {
                "type": "server" if entity == "screen" else "browser",
                "url": f"https://shop.example.com/{rng.choice(PAGES)}",
                **({"version": "3.2.1"} if entity == "screen" else {}),
            },
        }
        if rng.random() < 0.97:  # a few events come without an id: one is derived from the content
            event["id"] = f"{rng.getrandbits(64):016x}"
        if nested:
            event["nested"] = nested
        consent = self._consent()
        if consent is not None:
            event["consent"] = consent
        return event


def _bisect(x: float) -> int:
    lo, hi = 0, len(_CUM)
    while lo < hi:
        mid = (lo + hi) // 2
        if _CUM[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return min(lo, len(_CUM) - 1)


def write_events(path: Path, n: int, seed: int = SEED) -> dict:
    """Stream ``n`` events to ``path``; returns a few facts about the file."""
    size = 0
    with open(path, "wb", buffering=1 << 20) as f:
        for line in EventStream(n, seed).lines():
            f.write(line)
            f.write(b"\n")
            size += len(line) + 1
    return {"events": n, "bytes": size, "mean_line_bytes": round(size / max(1, n), 1)}
