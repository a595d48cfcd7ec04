"""The Segment write key: usable where it was resolved, never carried into a job graph.

The flow file is read where the pipeline is launched, and everything the DoFns hold is pickled
into the job graph (which Dataflow stores and shows). When the key came from ``$secret.NAME``
or ``$env.NAME``, only that reference is pickled; a worker resolves it again in ``setup()``:
from its environment, else from Secret Manager (secret ``NAME`` in the worker's project).
A key written literally in the flow file has no reference, and travels as written.
"""
from __future__ import annotations

import hashlib
import os


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


# -- the SDK's own logging ------------------------------------------------------------------------
class _RedactKeys:
    """A filter on the SDK's ``segment`` logger: at DEBUG it logs each request body, write key
    included. Records are filtered only once the level lets them through, so this costs nothing
    at the usual levels."""

    REDACTED = "[write key redacted]"

    def __init__(self):
        self.keys: set[str] = set()

    def filter(self, record) -> bool:
        if self.keys:
            text = record.getMessage()
            redacted = text
            for key in self.keys:
                redacted = redacted.replace(key, self.REDACTED)
            if redacted != text:
                record.msg, record.args = redacted, ()
        return True


_SDK_LOG_FILTER = _RedactKeys()


def redact_in_sdk_logs(key: str) -> None:
    """Keep ``key`` out of whatever the SDK logs (before a Client is built with it)."""
    import logging

    if not key:
        return
    logger = logging.getLogger("segment")
    if _SDK_LOG_FILTER not in logger.filters:
        logger.addFilter(_SDK_LOG_FILTER)
    _SDK_LOG_FILTER.keys.add(key)
