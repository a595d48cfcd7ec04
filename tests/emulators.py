"""The Pub/Sub and GCS emulators, started and stopped by the tests, on loopback only.

Each emulator runs in its own session (process group): ``gcloud`` starts a ``java`` child that
keeps the port when only the parent is killed, so the whole group is stopped. A missing
emulator binary is a test failure with a message saying what to install, never a skip.

Measured facts behind the choices here: ../../shared/notes/beam-on-this-machine.md, §2 and §4.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from support import poll_until

PROJECT = "walkeros-test"  # a valid project id: Beam checks the form of Pub/Sub paths
GCS_BUCKET = "walkeros-backfill"  # the bucket the GCS emulator starts with
LOOPBACK = "127.0.0.1"


class EmulatorError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# A small shell leads the emulator's session. It stops the emulator when it is told to (TERM) and
# also when this test process dies without stopping it (killed, say). gcloud moves itself into a
# process group of its own, with its java child: that group is ended, then the shell's own.
_WATCHDOG = r"""
"$@" &
child=$!
ends() {{
  kill -s "$1" -- "-$child" 2>/dev/null || kill -s "$1" "$child" 2>/dev/null
}}
stop() {{
  ends TERM
  n=0
  while [ $n -lt 50 ] && kill -s 0 -- "-$child" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
  ends KILL
  wait "$child"
  exit 0
}}
trap stop TERM INT HUP
while kill -s 0 {parent} 2>/dev/null && kill -s 0 "$child" 2>/dev/null; do sleep 1 & wait $!; done
stop
"""


class EmulatorProcess:
    """A server process in its own process group; ``stop()`` ends the group."""

    def __init__(self, name: str, argv: list[str], ready: Callable[[], bool], log_path: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None
        self.address: str | None = None  # host:port, where the emulator is addressed so
        self.url: str | None = None  # http://host:port, where it is addressed so
        self.port: int | None = None  # checked closed once stopped

    def start(self, timeout_s: float = 30.0) -> EmulatorProcess:
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                ["sh", "-c", _WATCHDOG.format(parent=os.getpid()), self.name, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        finally:
            log.close()  # the child holds its own copy
        if poll_until(lambda: self.process.poll() is not None or self.ready(), timeout_s):
            if self.process.poll() is None:
                return self
            raise EmulatorError(
                f"the {self.name} exited with code {self.process.returncode} before it was ready: {self.log_tail()}"
            )
        self.stop()
        raise EmulatorError(f"the {self.name} was not ready within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        pgid = process.pid  # start_new_session: the watchdog shell leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signal.SIGTERM)  # the shell ends the emulator's group, then itself
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait(5)
        deadline = time.monotonic() + timeout_s
        poll_until(lambda: not _group_alive(pgid) or _kill_group(pgid), timeout_s, interval_s=0.05)
        if self.port is not None and not poll_until(
            lambda: _port_closed(self.port), max(0.0, deadline - time.monotonic())
        ):
            raise EmulatorError(f"the {self.name} still listens on port {self.port} after it was stopped")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _port_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) != 0


def _kill_group(pgid: int) -> bool:
    """SIGKILL the group; False, so a wait goes on until the group is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _http_ok(url: str, expect: bytes | None = None) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with _no_proxy().open(url, timeout=1) as response:
                return expect is None or response.read().strip() == expect
        except (urllib.error.URLError, OSError):
            return False

    return check


def _no_proxy():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- Pub/Sub ---------------------------------------------------------------------------------
def require_gcloud() -> str:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise EmulatorError(
            "the Pub/Sub emulator tests need the Google Cloud CLI with its Pub/Sub emulator "
            "(Debian packages google-cloud-cli and google-cloud-cli-pubsub-emulator, plus a Java 17 runtime): "
            "`gcloud` is not on PATH"
        )
    return gcloud


def start_pubsub_emulator(data_dir: Path) -> EmulatorProcess:
    """``gcloud beta emulators pubsub start`` on a free loopback port (``.address`` is
    ``host:port``, for ``PUBSUB_EMULATOR_HOST``); the caller stops it."""
    gcloud = require_gcloud()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    process = EmulatorProcess(
        "Pub/Sub emulator",
        [
            gcloud,
            "beta",
            "emulators",
            "pubsub",
            "start",
            f"--host-port={address}",
            f"--data-dir={data_dir}",
            f"--project={PROJECT}",
            "--quiet",
        ],
        _http_ok(f"http://{address}/", b"Ok"),
        data_dir.parent / f"pubsub-emulator-{port}.log",
    )
    process.address, process.port = address, port
    return process.start(timeout_s=60)


class PubSub:
    """Topics, subscriptions, publishing and pulling against the emulator at ``host``."""

    def __init__(self, host: str, project: str = PROJECT):
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = host  # the clients read it when built
        self.project = project
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()

    def topic(self, name: str) -> str:
        path = f"projects/{self.project}/topics/{name}"
        self.publisher.create_topic(name=path)
        return path

    def subscription(self, topic: str, name: str) -> str:
        path = f"projects/{self.project}/subscriptions/{name}"
        self.subscriber.create_subscription(name=path, topic=topic, ack_deadline_seconds=60)
        return path

    def publish(self, topic: str, data: bytes | str, **attributes: str) -> str:
        if isinstance(data, str):
            data = data.encode()
        return self.publisher.publish(topic, data, **attributes).result(timeout=30)

    def pull(self, subscription: str, count: int, timeout_s: float, idle_s: float = 0.0) -> list:
        """Pull (and ack) until ``count`` messages arrived or ``timeout_s`` passed; then keep
        pulling for ``idle_s`` more, so that a message too many would be seen too."""
        from google.api_core import exceptions

        received = []
        deadline = time.monotonic() + timeout_s
        extra_until = None
        while True:
            now = time.monotonic()
            if extra_until is None and len(received) >= count:
                extra_until = now + idle_s
            if (extra_until is not None and now >= extra_until) or now >= deadline:
                return received
            try:
                response = self.subscriber.pull(subscription=subscription, max_messages=100, timeout=1.0, retry=None)
            except (exceptions.DeadlineExceeded, exceptions.RetryError):
                continue
            if response.received_messages:
                self.subscriber.acknowledge(
                    subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages]
                )
                received.extend(m.message for m in response.received_messages)
            else:
                time.sleep(0.05)

    @contextlib.contextmanager
    def heartbeats(self, topic: str, interval_s: float = 0.25):
        """Publish a heartbeat to ``topic`` every ``interval_s`` while the block runs.

        The streaming DirectRunner runs everything on one thread and pulls again before the
        elements it just read have gone downstream; on an idle subscription that pull blocks
        30 s. Heartbeats (dropped by ReadEvents) keep every pull short.
        """
        from transforms.read import HEARTBEAT_ATTRIBUTE

        stop = threading.Event()

        def pump():
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    self.publisher.publish(topic, b"", **{HEARTBEAT_ATTRIBUTE: "1"}).result(timeout=5)
                stop.wait(interval_s)

        thread = threading.Thread(target=pump, name="pubsub-heartbeats", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.publisher.transport.close()
        with contextlib.suppress(Exception):
            self.subscriber.close()


def close_direct_runner_pubsub_clients() -> None:
    """Close the DirectRunner's cached Pub/Sub subscriber clients now, while the emulator runs.

    For a topic read, the DirectRunner creates a temporary subscription and deletes it when the
    pipeline's transform is garbage collected -- at the latest at interpreter exit, when the
    emulator is long gone, and the delete then retries for 60 s. Tests only (private Beam names,
    checked so that a Beam upgrade fails loudly here)."""
    from apache_beam.runners.direct import transform_evaluator

    evaluator = getattr(transform_evaluator, "_PubSubReadEvaluator", None)
    cache = getattr(evaluator, "_subscriber_client_cache", None)
    if cache is None:
        raise EmulatorError(
            "apache_beam's _PubSubReadEvaluator._subscriber_client_cache changed: update "
            "tests/emulators.close_direct_runner_pubsub_clients for this Beam version"
        )
    for client in list(cache.values()):
        client.close()


# -- GCS -------------------------------------------------------------------------------------
def start_gcs_emulator(work_dir: Path, bucket: str) -> EmulatorProcess:
    """``gcp-storage-emulator`` (the PyPI package) in memory on a free loopback port, with
    ``bucket`` created (``.url`` is the endpoint, for ``STORAGE_EMULATOR_HOST``); the caller
    stops it."""
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    if not executable.exists():
        raise EmulatorError(f"the GCS tests need gcp-storage-emulator (setup.py's test extra): {executable} is missing")
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    process = EmulatorProcess(
        "GCS emulator",
        [
            str(executable),
            "start",
            f"--host={LOOPBACK}",
            f"--port={port}",
            "--in-memory",
            "--quiet",
            f"--default-bucket={bucket}",
        ],
        _http_ok(f"{url}/storage/v1/b/{bucket}"),
        work_dir / f"gcs-emulator-{port}.log",
    )
    process.url, process.port = url, port
    return process.start(timeout_s=30)


def short_circuit_gcp_credentials() -> None:
    """Skip the credential look-up Beam does on its first gs:// access in a process.

    With no credentials, Beam retries ``google.auth.default()`` 4 times with exponential backoff
    (its own retry decorator): about 25 s before it falls back to anonymous access, which is
    what the emulator wants. ``NO_GCE_CHECK`` alone does not shorten that (measured 23.7 s); it
    only skips google-auth's metadata-server probe. So Beam's private ``_Credentials`` cache is
    pre-filled with "no credentials". Tests only: it relies on a private Beam name, checked here
    so that a Beam upgrade that renames it fails loudly instead of making the tests slow.
    """
    os.environ["NO_GCE_CHECK"] = "True"
    from apache_beam.internal.gcp import auth

    credentials = getattr(auth, "_Credentials", None)
    if credentials is None or not hasattr(credentials, "_credentials_init"):
        raise EmulatorError(
            "apache_beam.internal.gcp.auth._Credentials changed: update "
            "tests/emulators.short_circuit_gcp_credentials for this Beam version"
        )
    credentials._credentials_init = True
    credentials._credentials = None
