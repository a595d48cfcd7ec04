"""One of our messages handed to segment-analytics-python's ``Client`` as the call it is: the
benchmark's bare-Client row and the tests that compare with what the Client builds use this."""

from __future__ import annotations

import datetime as dt
from typing import Any


def client_call(client: Any, message: dict) -> tuple[bool, dict]:
    """``client.<type>(...)`` for ``message``; the Client's ``(queued, message it built)``."""
    common = {
        "user_id": message.get("userId"),
        "anonymous_id": message.get("anonymousId"),
        "context": dict(message.get("context") or {}),
        "integrations": message.get("integrations"),
        "timestamp": dt.datetime.fromisoformat(message["timestamp"]),
        "message_id": message["messageId"],
    }
    kind = message["type"]
    if kind == "track":
        return client.track(event=message["event"], properties=message.get("properties"), **common)
    if kind == "identify":
        return client.identify(traits=message.get("traits"), **common)
    if kind == "group":
        return client.group(group_id=message["groupId"], traits=message.get("traits"), **common)
    return getattr(client, kind)(
        category=message.get("category"), name=message.get("name"), properties=message.get("properties"), **common
    )
