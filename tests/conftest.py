"""The tests' fixtures: a real local Segment endpoint on loopback, and the Pub/Sub and GCS
emulators (tests/emulators.py starts and stops them).

Each emulator lives for the module that uses it and is stopped (its whole process group) at the
end; the environment variables that point clients at it are restored afterwards. An emulator
that cannot start fails the tests with the reason, it never skips them.
"""

from __future__ import annotations

import os
import uuid

import emulators
import pytest
from support import WRITE_KEY

from local_segment import LocalSegment
from segment_api.http import SegmentHttp

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def endpoint():
    with LocalSegment(WRITE_KEY) as server:
        yield server


@pytest.fixture
def retry_waits(monkeypatch) -> list[float]:
    """The seconds the send layer waits between attempts, recorded instead of slept: every
    SegmentHttp built during the test gets this ``sleep`` (its injection point)."""
    waits: list[float] = []
    build = SegmentHttp.__init__

    def recording(self, *args, **kwargs):
        build(self, *args, **{**kwargs, "sleep": waits.append})

    monkeypatch.setattr(SegmentHttp, "__init__", recording)
    return waits


@pytest.fixture
def unique():
    """A short unique suffix for topic, subscription and object names."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def pubsub(tmp_path_factory):
    """A running Pub/Sub emulator and a :class:`emulators.PubSub` client for it."""
    saved = os.environ.get("PUBSUB_EMULATOR_HOST")
    process = _started(emulators.start_pubsub_emulator, tmp_path_factory.mktemp("pubsub") / "data")
    client = None
    try:
        client = emulators.PubSub(process.address)
        yield client
    finally:
        if client is not None:
            client.close()
        process.stop()
        _restore("PUBSUB_EMULATOR_HOST", saved)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A running GCS emulator with bucket :data:`emulators.GCS_BUCKET`, ``STORAGE_EMULATOR_HOST``
    set and Beam's credential look-up short-circuited; yields a ``google.cloud.storage`` Bucket."""
    saved = {name: os.environ.get(name) for name in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK")}
    process = _started(emulators.start_gcs_emulator, tmp_path_factory.mktemp("gcs"), emulators.GCS_BUCKET)
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = process.url
        emulators.short_circuit_gcp_credentials()
        from google.cloud import storage

        client = storage.Client.create_anonymous_client()
        client.project = emulators.PROJECT
        yield client.bucket(emulators.GCS_BUCKET)
    finally:
        process.stop()
        for name, value in saved.items():
            _restore(name, value)


def _started(start, *args) -> emulators.EmulatorProcess:
    try:
        return start(*args)
    except emulators.EmulatorError as exc:
        pytest.fail(str(exc), pytrace=False)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
