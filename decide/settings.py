"""The Segment destination's settings (``config.settings`` of the flow file), typed.

Values that arrive through ``$env`` are strings; :func:`coerce_settings` turns them into the
number or boolean a setting needs and reports, per setting, what did not parse. The write key
is held here but never shown: it is left out of ``repr`` and of every error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decide.secrets import WriteKey

SDK_PATH = "/v1/batch"

# setting -> (type, default). Mapping values (userId, identify, ...) are kept raw here and
# compiled by the destination.
INT_SETTINGS = {"flushAt": 15, "flushInterval": 10000, "maxRetries": 3, "httpRequestTimeout": 10000}
BOOL_SETTINGS = {"disable": False, "gzip": False}


@dataclass(frozen=True)
class SegmentSettings:
    write_key: WriteKey = field(repr=False)
    user_id: Any = "user.id"
    anonymous_id: Any = "user.session"
    host: str = "https://api.segment.io"
    path: str = SDK_PATH
    flush_at: int = 15
    flush_interval_ms: int = 10000
    max_retries: int = 3
    http_request_timeout_ms: int = 10000
    disable: bool = False
    gzip: bool = False  # gzip request bodies (segment-analytics-python's gzip option)
    identify: Any = None
    group: Any = None
    consent: dict | None = None
    integrations: dict | None = None

    @classmethod
    def from_config(cls, settings: dict, write_key: WriteKey | None = None) -> SegmentSettings:
        """From an already coerced and schema-validated ``config.settings`` dict; ``write_key``
        carries where the key came from (see decide.secrets), else it is the literal."""
        return cls(
            write_key=write_key or WriteKey(settings["writeKey"]),
            user_id=settings.get("userId", "user.id"),
            anonymous_id=settings.get("anonymousId", "user.session"),
            host=settings.get("host", "https://api.segment.io"),
            path=settings.get("path", SDK_PATH),
            flush_at=settings.get("flushAt", 15),
            flush_interval_ms=settings.get("flushInterval", 10000),
            max_retries=settings.get("maxRetries", 3),
            http_request_timeout_ms=settings.get("httpRequestTimeout", 10000),
            disable=settings.get("disable", False),
            gzip=settings.get("gzip", False),
            identify=settings.get("identify"),
            group=settings.get("group"),
            consent=settings.get("consent") or None,
            integrations=settings.get("integrations") or None,
        )

    def sdk_host(self) -> str:
        """The ``host`` the Python SDK needs so that it posts to ``host + path``.

        The SDK always appends ``/v1/batch`` to its host; a ``path`` that ends in ``/v1/batch``
        becomes a host prefix, any other path cannot be reached through the SDK.
        """
        if not self.path.endswith(SDK_PATH):
            raise ValueError(
                f"settings.path {self.path!r}: segment-analytics-python always posts to <host>/v1/batch, "
                "so the path must end with /v1/batch (a prefix before it is fine)"
            )
        return self.host.rstrip("/") + self.path[: -len(SDK_PATH)]


def coerce_settings(settings: dict, path: str) -> tuple[dict, list[str]]:
    """Coerce string values of numeric and boolean settings; return (settings, errors)."""
    out = dict(settings)
    errors: list[str] = []
    for key in INT_SETTINGS:
        if isinstance(out.get(key), str):
            text = out[key].strip()
            try:
                out[key] = int(text)
            except ValueError:
                errors.append(f"{path}.{key}: expected an integer, got {out[key]!r}")
    for key in BOOL_SETTINGS:
        if isinstance(out.get(key), str):
            value = parse_boolean(out[key]) if out[key].strip() else False
            if value is None:
                errors.append(f"{path}.{key}: expected a boolean (true/false), got {out[key]!r}")
            else:
                out[key] = value
    return out, errors


def parse_boolean(text: str) -> bool | None:
    """true/1/yes → True, false/0/no → False (any case, spaces around ignored), else None."""
    value = str(text).strip().lower()
    return True if value in ("true", "1", "yes") else False if value in ("false", "0", "no") else None
