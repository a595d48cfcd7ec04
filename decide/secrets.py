"""The Segment write key: usable where it was resolved, never carried into a job graph.

The flow file is read where the pipeline is launched, and everything the DoFns hold is pickled
into the job graph (which Dataflow stores and shows). When the key came from ``$secret.NAME``
or ``$env.NAME``, only that reference is pickled; a worker resolves it again in ``setup()``:
from its environment, else from Secret Manager (secret ``NAME`` in the worker's project).
With ``--write_key_secret projects/P/secrets/S/versions/V`` only that resource name travels,
and workers read exactly that version (any project). A key written literally in the flow file
has no reference, and travels as written.

Wherever a key is resolved (start-up or a worker), it is checked the same way
(:func:`checked_key`): surrounding whitespace is stripped and said so, and a key that is empty
or still a reference is refused, so nothing is ever sent with a key that cannot be right.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re

_LOG = logging.getLogger(__name__)

# What a reference looks like once resolution is over: it was left unresolved (a variable
# whose value names another reference, a reference inside a longer string, ...).
_LEFT_REFERENCE = re.compile(r"\$(?:env|secret|var|flow|store|contract)\.[A-Za-z_][A-Za-z0-9_.]*")
# projects/P/secrets/S/versions/V, as Secret Manager names a secret version.
SECRET_VERSION = re.compile(r"^projects/[^/\s]+/secrets/[A-Za-z0-9_-]{1,255}/versions/(latest|[1-9][0-9]*)$")


class WriteKeyProblem(ValueError):
    """A resolved key that cannot be right (empty, or a reference left unresolved)."""


def checked_key(value: str, source: str) -> tuple[str, str | None]:
    """``(key, notice)``: the key without surrounding whitespace, and a line saying that it was
    stripped (never the key itself). Raises :class:`WriteKeyProblem` for a key that cannot be
    right. ``source`` says where the key came from, for the messages."""
    if not isinstance(value, str):
        raise WriteKeyProblem(f"the write key from {source} is not a string")
    key = value.strip()
    notice = None
    if key != value:
        notice = (
            f"the write key from {source} had surrounding whitespace or newlines "
            f"({len(value) - len(key)} characters); they were removed"
        )
    if not key:
        raise WriteKeyProblem(f"the write key from {source} is empty")
    left = _LEFT_REFERENCE.search(key)
    if left:
        # Only the reference is shown: text around it could be part of a real key.
        shown = key if left.group(0) == key else left.group(0)[:80] + "..."
        raise WriteKeyProblem(
            f"the write key from {source} is the unresolved reference {shown!r}: write the reference "
            'itself as writeKey ("$secret.NAME" or "$env.NAME")'
        )
    return key, notice


class WriteKeyUnavailable(RuntimeError):
    pass


class WriteKey:
    __slots__ = ("_value", "env_name", "default", "secret_version")

    def __init__(
        self,
        value: str | None = None,
        env_name: str | None = None,
        default: str | None = None,
        secret_version: str | None = None,
    ):
        if value is None and env_name is None and secret_version is None:
            raise ValueError("a write key needs a value or a reference")
        self._value = value
        self.env_name = env_name
        self.default = default
        self.secret_version = secret_version  # projects/P/secrets/S/versions/V (--write_key_secret)

    def reveal(self) -> str:
        """The key itself: only for the Segment client, never for logs or records."""
        if self._value is None:
            self._value = self._resolve()
        return self._value

    def _resolve(self) -> str:
        if self.secret_version is not None:
            return _worker_checked(_from_secret_version(self.secret_version), f"secret {self.secret_version}")
        assert self.env_name is not None  # a key is named by a secret version or an environment variable
        value = os.environ.get(self.env_name)
        if value:
            return _worker_checked(value, f"environment variable {self.env_name}")
        if self.default is not None:
            return _worker_checked(self.default, f"the default of $env.{self.env_name}")
        return _worker_checked(_from_secret_manager(self.env_name), f"Secret Manager secret {self.env_name}")

    def resolvable_here(self) -> bool:
        """Whether this process can supply the key without asking Secret Manager."""
        if self.secret_version is not None:
            return self._value is not None
        return self._value is not None or bool(os.environ.get(self.env_name or "")) or self.default is not None

    def fingerprint(self) -> str:
        """Tells keys apart (for pooling clients) without revealing them."""
        origin = self.secret_version or self.env_name
        return hashlib.sha256(f"{origin}\x00{self.reveal()}".encode()).hexdigest()

    def __reduce__(self):
        if self.secret_version is not None:
            return WriteKey, (None, None, None, self.secret_version)
        if self.env_name is not None:
            return WriteKey, (None, self.env_name, self.default)
        return WriteKey, (self._value, None, None)

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return self.reveal() == other
        return isinstance(other, WriteKey) and (self.secret_version, self.env_name, self.reveal()) == (
            other.secret_version,
            other.env_name,
            other.reveal(),
        )

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        if self.secret_version:
            return f"WriteKey(from {self.secret_version})"
        return f"WriteKey(from {self.env_name})" if self.env_name else "WriteKey(***)"


def _worker_checked(value: str, source: str) -> str:
    """A key resolved late (on a worker) passes the same check as one resolved at start-up;
    a bad one fails the worker's setup with one clear line instead of being sent."""
    try:
        key, notice = checked_key(value, source)
    except WriteKeyProblem as exc:
        raise WriteKeyUnavailable(f"the Segment write key cannot be used: {exc}") from None
    if notice:
        _LOG.warning(notice)
    return key


def _from_secret_version(version_name: str) -> str:
    """Exactly this secret version, through Beam's own Secret Manager client wrapper."""
    return _read_secret(
        {"version_name": version_name},
        lambda cause: (
            f"the Segment write key is not available: Secret Manager secret version {version_name} "
            f"could not be read ({cause}). Grant the worker service account "
            "roles/secretmanager.secretAccessor on that secret (in its own project)."
        ),
    )


def _from_secret_manager(name: str) -> str:
    """``$secret.NAME`` without that environment variable: the latest version of secret NAME in
    the worker's project (``GOOGLE_CLOUD_PROJECT``, else the credentials' project)."""
    return _read_secret(
        {"name": name},
        lambda cause: (
            f"the Segment write key is not available on this worker: environment variable {name} is "
            f"not set and Secret Manager secret {name!r} could not be read ({cause}). On Dataflow, "
            f"create the secret and grant the worker service account roles/secretmanager.secretAccessor, "
            f"or name any secret version with the write_key_secret parameter."
        ),
    )


def _read_secret(spec: dict, failure) -> str:
    """The secret ``spec`` names (``GcpSecret.from_dict``); ``failure(cause)`` says what went wrong."""
    from apache_beam.utils.secret import GcpSecret

    try:  # from_dict itself fails when no project can be found: inside the same handling
        return GcpSecret.from_dict(spec).get_secret_bytes().decode("utf-8")
    except Exception as exc:  # any failure means the same thing to the user
        raise WriteKeyUnavailable(failure(_cause(exc))) from None


def _cause(exc: BaseException) -> str:
    # GcpSecret wraps the client's error in a RuntimeError whose text holds the secret's name and
    # the client's message, never the payload: keep its first line.
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


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
