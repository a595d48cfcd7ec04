"""The Segment write key: usable where it was resolved, never carried into a job graph.

The flow file is read where the pipeline is launched, and everything the DoFns hold is pickled
into the job graph (which Dataflow stores and shows). When the key came from ``$secret.NAME``
or ``$env.NAME``, only that reference is pickled; a worker resolves it again in ``setup()``:
from its environment, else from Secret Manager (secret ``NAME`` in the worker's project).
A key written literally in the flow file has no reference, and travels as written.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re


class WriteKeyUnavailable(RuntimeError):
    pass


class WriteKey:
    __slots__ = ("_value", "env_name", "default")

    def __init__(self, value: str | None = None, env_name: str | None = None, default: str | None = None):
        if value is None and env_name is None:
            raise ValueError("a write key needs a value or a reference")
        self._value = value
        self.env_name = env_name
        self.default = default

    def reveal(self) -> str:
        """The key itself: only for the Segment client, never for logs or records."""
        if self._value is None:
            self._value = self._resolve()
        return self._value

    def _resolve(self) -> str:
        value = os.environ.get(self.env_name)
        if value:
            return value
        if self.default is not None:
            return self.default
        return _from_secret_manager(self.env_name)

    def resolvable_here(self) -> bool:
        """Whether this process can supply the key without asking Secret Manager."""
        return self._value is not None or bool(os.environ.get(self.env_name)) or self.default is not None

    def fingerprint(self) -> str:
        """Tells keys apart (for pooling clients) without revealing them."""
        return hashlib.sha256(f"{self.env_name}\x00{self.reveal()}".encode()).hexdigest()

    def __reduce__(self):
        if self.env_name is not None:
            return WriteKey, (None, self.env_name, self.default)
        return WriteKey, (self._value, None, None)

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return self.reveal() == other
        return isinstance(other, WriteKey) and (self.env_name, self.reveal()) == (other.env_name, other.reveal())

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"WriteKey(from {self.env_name})" if self.env_name else "WriteKey(***)"


def _from_secret_manager(name: str) -> str:
    try:
        import google.auth
        from google.cloud import secretmanager

        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or google.auth.default()[1]
        client = secretmanager.SecretManagerServiceClient()
        path = f"projects/{project}/secrets/{name}/versions/latest"
        return client.access_secret_version(name=path).payload.data.decode("utf-8")
    except Exception as exc:  # any failure means the same thing to the user
        raise WriteKeyUnavailable(
            f"the Segment write key is not available on this worker: environment variable {name} is not "
            f"set and Secret Manager secret {name!r} could not be read ({type(exc).__name__}). On Dataflow, "
            f"create the secret and grant the worker service account roles/secretmanager.secretAccessor."
        ) from None


# -- redaction ------------------------------------------------------------------------------------
REDACTED = "[write key redacted]"
# Characters a write key is made of: a form of the key that touches one of them is part of a
# longer word ("x" inside "exceeded"), not the key.
_WORD = r"A-Za-z0-9_\-"


def key_forms(key: str) -> list[str]:
    """Every form in which the client sends ``key``: as written, JSON-escaped (the body's
    ``writeKey``), and base64 in the Basic ``Authorization`` header (``key:``, with and without
    padding, and the key alone), longest first."""
    encoded = base64.b64encode(f"{key}:".encode()).decode()
    forms = {key, json.dumps(key)[1:-1], encoded, encoded.rstrip("="), base64.b64encode(key.encode()).decode()}
    return sorted((f for f in forms if f), key=len, reverse=True)


def redact_secret(text: str, key: str | None) -> str:
    """``text`` with ``key`` replaced wherever it appears as a value in any form the client sent
    it (:func:`key_forms`), never inside a longer word: a one-character key does not mangle the
    rest of an error message."""
    if not key or not text:
        return text
    for form in key_forms(key):
        if form in text:
            text = re.sub(rf"(?<![{_WORD}]){re.escape(form)}(?![{_WORD}])", REDACTED, text)
    return text
