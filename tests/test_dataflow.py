"""Ready for Dataflow: the Flex Template launches without any secret, the image recipe follows
the conventions (checked statically: no Docker daemon here), metadata.json carries what the
console uses, and the write key is resolved where it is needed only, and checked wherever it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import emulators
import pytest
from emulators import GCS_BUCKET
from support import WRITE_KEY, flow_document

from decide.flow import flow_from_document
from decide.secrets import WriteKey, WriteKeyUnavailable
from pipeline import cli

ROOT = Path(__file__).resolve().parent.parent
DATAFLOW = ROOT / "dataflow"
EXAMPLE_FLOW = ROOT / "examples" / "flow.json"
EXAMPLE_EVENTS = ROOT / "examples" / "events.jsonl"
IMAGE = "europe-west1-docker.pkg.dev/my-project/dataflow/walkeros-segment:0123456789ab"
# What a Flex Template launch passes besides the template parameters (Dataflow's own options).
JOB_OPTIONS = [
    "--project=my-project",
    "--region=europe-west1",
    "--temp_location=gs://my-bucket/temp",
    "--staging_location=gs://my-bucket/staging",
    f"--sdk_container_image={IMAGE}",
]
STREAMING_PARAMETERS = [
    "--input_subscription=projects/my-project/subscriptions/walkeros-events",
    "--dead_letter_topic=projects/my-project/topics/walkeros-dead-letters",
    "--id_label=event_id",
    "--message_id_namespace=acme-web-prod",
]
SECRET_VERSION = "projects/other-project/secrets/segment-write-key/versions/3"


def _load_dataflow_module(name: str):
    spec = importlib.util.spec_from_file_location(f"dataflow_{name}", DATAFLOW / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_key_in_environment(monkeypatch):
    for name in ("SEGMENT_WRITE_KEY", "SEG_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_credential_lookup():
    """Beam's first Google Cloud access waits ~25 s for credentials this machine does not have."""
    emulators.short_circuit_gcp_credentials()


def _launch_dry(monkeypatch, argv: list[str]):
    """Run dataflow/launch.py as the launcher does, up to the job Beam would submit
    (``--dry_run``: Beam's DataflowRunner builds the whole job, then stops before the API call).
    Returns (exit code, the built job or None)."""
    built = []
    real_launch = cli.launch

    def recording_launch(options, spec):
        result = real_launch(options, spec)
        built.append(result.job)
        return result

    monkeypatch.setattr(cli, "launch", recording_launch)
    launch = _load_dataflow_module("launch")
    code = launch.main([*argv, *JOB_OPTIONS, "--dry_run=true"])
    return code, (built[0] if built else None)


def _job_text(job) -> bytes:
    """Everything the job request would carry: options, environment and the pipeline proto
    with every pickled DoFn decoded."""
    from support import pickled_code

    pipeline = job.proto_pipeline
    payloads = [t.spec.payload for t in pipeline.components.transforms.values() if t.spec.payload]
    return b"\n".join([str(job).encode(), pipeline.SerializeToString(), *[pickled_code(p) for p in payloads]])


# -- the launch ----------------------------------------------------------------------------------
@pytest.mark.parametrize("write_key", ["$env.SEGMENT_WRITE_KEY", "$secret.SEGMENT_WRITE_KEY"])
def test_the_bundled_example_launches_as_a_template_with_no_secret_in_the_launcher(
    monkeypatch, tmp_path, capsys, write_key
):
    _without_key_in_environment(monkeypatch)
    flow = json.loads(EXAMPLE_FLOW.read_text())
    flow["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["writeKey"] = write_key
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    code, job = _launch_dry(monkeypatch, [f"--flow={path}", *STREAMING_PARAMETERS])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "dry run: the streaming job was built for Dataflow and not submitted" in out.out
    assert job is not None and job.proto.type.name == "JOB_TYPE_STREAMING"
    # The workers start from the template's image, with nothing staged for them to install.
    assert IMAGE.encode() in _job_text(job)
    assert b"workflow.tar.gz" not in _job_text(job)
    # ...and the reference, never a key, is what travels: the workers resolve it.
    from apache_beam.portability.api import beam_runner_api_pb2

    reads = [
        t for t in job.proto_pipeline.components.transforms.values() if t.spec.urn == "beam:transform:pubsub_read:v1"
    ]
    assert reads and beam_runner_api_pb2.PubSubReadPayload.FromString(reads[0].spec.payload).id_attribute == "event_id"
    assert b"SEGMENT_WRITE_KEY" in _job_text(job)


def test_the_launcher_process_runs_the_entry_point_file_with_no_secret_anywhere(tmp_path):
    """Exactly as Dataflow's launcher does it: a new Python process running the file named by
    FLEX_TEMPLATE_PYTHON_PY_FILE with --name=value flags, in an environment without any key."""
    dockerfile = (DATAFLOW / "Dockerfile").read_text()
    entry = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/(\S+)$", dockerfile, re.M).group(1)
    environment = {k: v for k, v in os.environ.items() if "WRITE_KEY" not in k and not k.startswith("SEG")}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / entry),
            f"--flow={EXAMPLE_FLOW}",
            *STREAMING_PARAMETERS,
            *JOB_OPTIONS,
            "--dry_run=true",
        ],
        cwd=tmp_path,
        env={**environment, "NO_GCE_CHECK": "True"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: the streaming job was built for Dataflow and not submitted" in result.stdout


def test_the_unchanged_bundled_example_launches_for_a_backfill(gcs, monkeypatch, capsys):  # noqa: F811
    """The example flow file as shipped ($env.SEGMENT_WRITE_KEY), read from gs:// as the launcher
    reads it, for a batch backfill from gs:// (the GCS emulator): no key anywhere."""
    _without_key_in_environment(monkeypatch)
    gcs.blob("launch/flow.json").upload_from_string(EXAMPLE_FLOW.read_bytes())
    gcs.blob("launch/events/part-1.jsonl").upload_from_string(EXAMPLE_EVENTS.read_bytes())
    code, job = _launch_dry(
        monkeypatch,
        [
            f"--flow=gs://{GCS_BUCKET}/launch/flow.json",
            f"--input=gs://{GCS_BUCKET}/launch/events/*.jsonl",
            f"--dead_letter=gs://{GCS_BUCKET}/launch/dead-letters",
        ],
    )
    assert code == 0, capsys.readouterr().err
    assert job.proto.type.name == "JOB_TYPE_BATCH"


def test_a_launch_with_a_secret_version_parameter_carries_its_name_only(monkeypatch, tmp_path, capsys):
    _without_key_in_environment(monkeypatch)
    code, job = _launch_dry(
        monkeypatch, [f"--flow={EXAMPLE_FLOW}", *STREAMING_PARAMETERS, f"--write_key_secret={SECRET_VERSION}"]
    )
    assert code == 0, capsys.readouterr().err
    assert SECRET_VERSION.encode() in _job_text(job)


def test_without_the_image_parameter_the_launcher_stages_the_package_itself(monkeypatch):
    launch = _load_dataflow_module("launch")
    seen = []
    monkeypatch.setattr(launch, "cli_main", lambda argv: seen.append(argv) or 0)
    assert launch.main(["--flow=gs://b/f.json"]) == 0
    assert seen == [["run", "--flow=gs://b/f.json", "--runner=DataflowRunner", f"--setup_file={ROOT / 'setup.py'}"]]
    seen.clear()
    assert launch.main(["--flow=gs://b/f.json", f"--sdk_container_image={IMAGE}"]) == 0
    assert seen == [["run", "--flow=gs://b/f.json", f"--sdk_container_image={IMAGE}", "--runner=DataflowRunner"]]


# -- the write key: checked wherever it is resolved ---------------------------------------------
def _document(write_key, variables: dict | None = None) -> dict:
    doc = flow_document({"writeKey": write_key})
    if variables:
        doc["variables"] = variables
    return doc


def _flow_file(tmp_path: Path, doc: dict, host: str = "http://127.0.0.1:9") -> str:
    doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["host"] = host
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _commands(flow: str, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "validate": ["validate", "--flow", flow],
        "explain": ["explain", "--flow", flow, "--input", str(EXAMPLE_EVENTS)],
        "run": ["run", "--flow", flow, "--input", str(EXAMPLE_EVENTS), "--dead_letter", str(tmp_path / "dl")],
    }


def test_a_variable_naming_an_env_reference_is_resolved_and_travels_as_that_reference():
    """walkerOS resolves references inside variables; so do we: `$var.wk` whose value is
    "$env.SEGMENT_WRITE_KEY" is that variable's value, never the literal text."""
    doc = _document("$var.wk", {"wk": "$env.SEGMENT_WRITE_KEY"})
    flow = flow_from_document(doc, env={"SEGMENT_WRITE_KEY": "the-real-key"})
    assert flow.settings.write_key.reveal() == "the-real-key"
    shipped = pickle.dumps(flow.settings)
    assert b"the-real-key" not in shipped and b"SEGMENT_WRITE_KEY" in shipped
    # ...and like any $env key it is left to the workers when launching on Dataflow
    deferred = flow_from_document(doc, env={}, defer_write_key=True)
    assert deferred.settings.write_key.env_name == "SEGMENT_WRITE_KEY"


@pytest.mark.parametrize(
    "write_key, variables, expected",
    [
        ("$var.a", {"a": "$var.b", "b": "$var.a"}, "cycle: $var.a -> $var.b -> $var.a"),
        ("$var.wk", {"wk": "$flow.other.key"}, "unresolved reference '$flow.other.key'"),
        ("key-$secret.SEG_KEY", None, "unresolved reference '$secret.SEG_KEY...'"),
        ("  \n\t", None, "the write key from the flow file is empty"),
        ("$env.BLANK_KEY", None, "the write key from $env.BLANK_KEY is empty"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "explain", "run"])
def test_a_write_key_that_cannot_be_right_stops_every_command_with_one_line(
    tmp_path, monkeypatch, capsys, write_key, variables, expected, command
):
    monkeypatch.setenv("BLANK_KEY", "   ")
    flow = _flow_file(tmp_path, _document(write_key, variables))
    assert cli.main(_commands(flow, tmp_path)[command]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "explain", "run"])
def test_whitespace_around_a_key_is_stripped_and_said_without_the_key(tmp_path, monkeypatch, capsys, endpoint, command):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", f"  {WRITE_KEY}\n")
    flow = _flow_file(tmp_path, _document("$env.SEGMENT_WRITE_KEY"), host=endpoint.url)
    # The bundled example holds three bad inputs on purpose: explain and run say so (exit 3).
    assert cli.main(_commands(flow, tmp_path)[command]) == (0 if command == "validate" else 3)
    err = capsys.readouterr().err
    assert (
        "writeKey: the write key from $env.SEGMENT_WRITE_KEY had surrounding whitespace or newlines "
        "(3 characters); they were removed"
    ) in err
    assert WRITE_KEY not in err
    if command == "run":  # the local endpoint drops messages sent with any other key
        assert endpoint.accepted and not endpoint.counters.get("dropped:bad_write_key")


@pytest.mark.parametrize(
    "late_value, expected",
    [
        ("   ", "the write key from environment variable SEGMENT_WRITE_KEY is empty"),
        ("$env.OTHER_KEY", "is the unresolved reference '$env.OTHER_KEY'"),
    ],
)
def test_a_key_resolved_late_on_a_worker_that_cannot_be_right_fails_clearly_and_sends_nothing(
    monkeypatch, endpoint, late_value, expected
):
    from support import run_pipeline

    from decide.destination import DestinationSpec

    doc = _document("$env.SEGMENT_WRITE_KEY")
    doc["flows"]["default"]["destinations"]["segment"]["config"]["settings"]["host"] = endpoint.url
    flow = flow_from_document(doc, env={}, defer_write_key=True)  # the launcher: no key
    spec = DestinationSpec.from_flow(flow, namespace="late")
    monkeypatch.setenv("SEGMENT_WRITE_KEY", late_value)  # the worker's environment
    event = {"name": "page view", "id": "late-1", "timestamp": 1767225600000, "user": {"session": "s-1"}}
    with pytest.raises(Exception) as caught:
        run_pipeline(spec, [json.dumps(event)])
    assert "the Segment write key cannot be used" in str(caught.value) and expected in str(caught.value)
    assert not endpoint.requests


# -- the write key from a Secret Manager version named by a parameter ---------------------------
class FakeSecretManager:
    """Stands in for google.cloud.secretmanager.SecretManagerServiceClient, the one boundary
    there is no emulator for: it answers access_secret_version the way the service does."""

    versions: dict[str, bytes] = {}
    asked: list[str] = []

    def access_secret_version(self, request=None, name=None):
        from types import SimpleNamespace

        name = (request or {}).get("name", name)
        FakeSecretManager.asked.append(name)
        if name not in self.versions:
            raise LookupError(f"404 Secret Version [{name}] not found or has no versions.")
        return SimpleNamespace(name=name, payload=SimpleNamespace(data=self.versions[name]))


@pytest.fixture
def secret_manager(monkeypatch):
    from google.cloud import secretmanager

    FakeSecretManager.versions = {SECRET_VERSION: f"{WRITE_KEY}\n".encode()}
    FakeSecretManager.asked = []
    monkeypatch.setattr(secretmanager, "SecretManagerServiceClient", FakeSecretManager)
    return FakeSecretManager


def test_a_run_reads_the_key_from_the_named_secret_version_of_another_project(
    tmp_path, monkeypatch, capsys, endpoint, secret_manager
):
    _without_key_in_environment(monkeypatch)
    flow = _flow_file(tmp_path, _document("$secret.SEGMENT_WRITE_KEY"), host=endpoint.url)
    code = cli.main(
        [
            "run",
            "--flow",
            flow,
            "--input",
            str(EXAMPLE_EVENTS),
            "--dead_letter",
            str(tmp_path / "dl"),
            f"--write_key_secret={SECRET_VERSION}",
        ]
    )
    assert code == 3, capsys.readouterr().err  # the example's three bad inputs are dead letters
    # Exactly that version was read (start-up check, then the sink's setup), and the key worked:
    # the endpoint drops messages sent with any other key. Its trailing newline was stripped.
    assert set(secret_manager.asked) == {SECRET_VERSION}
    assert endpoint.accepted and not endpoint.counters.get("dropped:bad_write_key")


def test_the_secret_version_travels_as_its_name_and_is_read_on_the_worker(secret_manager):
    key = WriteKey(secret_version=SECRET_VERSION)
    assert key.reveal() == WRITE_KEY
    shipped = pickle.dumps(key)
    assert WRITE_KEY.encode() not in shipped
    secret_manager.asked.clear()
    assert pickle.loads(shipped).reveal() == WRITE_KEY and secret_manager.asked == [SECRET_VERSION]
    secret_manager.versions[SECRET_VERSION] = b" \n"
    with pytest.raises(WriteKeyUnavailable, match="the write key from secret .* is empty"):
        pickle.loads(shipped).reveal()


@pytest.mark.parametrize(
    "value, writekey, expected",
    [
        ("segment-write-key", "$secret.SEGMENT_WRITE_KEY", "expected a Secret Manager version name"),
        ("projects/p/secrets/s", "$secret.SEGMENT_WRITE_KEY", "expected a Secret Manager version name"),
        (SECRET_VERSION, "a-literal-key", "give the key in one place"),
        (
            "projects/other-project/secrets/missing/versions/1",
            "$secret.SEGMENT_WRITE_KEY",
            "Secret Manager secret version projects/other-project/secrets/missing/versions/1 could not be read",
        ),
    ],
)
def test_a_wrong_secret_parameter_is_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, secret_manager, value, writekey, expected
):
    _without_key_in_environment(monkeypatch)
    flow = _flow_file(tmp_path, _document(writekey))
    code = cli.main(
        [
            "run",
            "--flow",
            flow,
            "--input",
            str(EXAMPLE_EVENTS),
            "--dead_letter",
            str(tmp_path / "dl"),
            f"--write_key_secret={value}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


# -- the image, checked statically (no Docker daemon here) ---------------------------------------
def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def test_the_dockerfile_follows_the_flex_template_conventions():
    dockerfile = (DATAFLOW / "Dockerfile").read_text()
    steps = _instructions(dockerfile)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    # A dated launcher release, never a moving tag.
    launcher = args["LAUNCHER_IMAGE"]
    assert re.fullmatch(r"gcr\.io/dataflow-templates-base/python311-template-launcher-base:\d{8}_RC\d\d", launcher)
    # Every stage is built for Dataflow's x86-64 workers, whatever machine builds it.
    froms = [a for i, a in steps if i == "FROM"]
    assert len(froms) == 2 and all(a.startswith("--platform=linux/amd64 ") for a in froms)
    # The image is the workers' SDK container: no setup file for the launcher to stage.
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", dockerfile, re.M))
    assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in env and "FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE" not in env
    assert env["FLEX_TEMPLATE_PYTHON_PY_FILE"] == "/template/dataflow/launch.py"
    # Dependencies only from the hashed lock; the package itself with no dependency resolution.
    pips = [a for i, a in steps if i == "RUN" and "pip install" in a]
    assert any(re.search(r"pip install .*--require-hashes -r dataflow/requirements\.lock", a) for a in pips)
    installs = [seg.strip() for a in pips for seg in a.split("&&") if "pip install" in seg]
    assert all("--require-hashes" in seg or "--no-deps" in seg for seg in installs), installs
    assert all("--no-cache-dir" in seg for seg in installs)


def test_hadolint_finds_nothing_in_the_dockerfile():
    """Docker's best practices, by the usual linter (installed with the test extra). Its one
    ignored rule, DL3029, disagrees with pinning the platform in FROM, which Dataflow needs."""
    hadolint = Path(sys.executable).parent / "hadolint"
    dockerfile = DATAFLOW / "Dockerfile"
    assert set(re.findall(r"# hadolint ignore=(\S+)", dockerfile.read_text())) == {"DL3029"}
    result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lock_pins_every_runtime_dependency_with_a_hash_as_constraints_txt_does():
    lock = _load_dataflow_module("lock")
    text = (DATAFLOW / "requirements.lock").read_text()
    assert lock.problems(text) == []
    entries = lock.read_lock(text)
    # The whole installed runtime tree is in it (what this venv runs the tests with).
    from importlib import metadata

    for requirement in lock.runtime_requirements():
        name = re.match(r"^[^\[=]+", requirement).group(0)
        assert entries[lock.canonical(name)][0] == metadata.version(name)
    for _version, digest in entries.values():
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
    # The image builds the package with --no-build-isolation: what builds it (and compiles its
    # decide layer) is locked too.
    assert "setuptools" in entries and "wheel" in entries and "cython" in entries
    # A lock that drifts from constraints.txt is refused, offline.
    drifted = text.replace(f"orjson=={entries['orjson'][0]}", "orjson=0.0.1")
    assert lock.problems(drifted)
    assert lock.problems(text.replace(" --hash=sha256:", " #", 1))


def test_the_docker_build_context_holds_only_what_the_image_copies(tmp_path):
    """.dockerignore (for a build from the repository root) admits what the Dockerfile copies and
    nothing else; build.sh's context holds the same files."""
    patterns = [
        l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert patterns[0] == "**"

    def included(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = False
        for pattern in patterns:
            negate, body = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
            if re.fullmatch(regex + r"(/.*)?", path):
                keep = negate
        return keep

    dockerfile = (DATAFLOW / "Dockerfile").read_text()
    copied = [s for sources, _ in re.findall(r"^COPY (?!--from)(.+) (\S+)$", dockerfile, re.M) for s in sources.split()]
    for source in copied:
        assert included(source) and (ROOT / source).exists(), source
    for unwanted in (
        ".venv/bin/python",
        "tests/test_dataflow.py",
        ".git/HEAD",
        "out/demo/x.jsonl",
        "bench/results/latest.json",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "README.md",
    ):
        assert not included(unwanted), unwanted
    context = tmp_path / "context"
    subprocess.run(["bash", str(DATAFLOW / "build.sh"), "context", str(context)], check=True)
    assert (context / "dataflow" / "requirements.lock").read_bytes() == (DATAFLOW / "requirements.lock").read_bytes()


def test_the_image_tag_says_when_the_tree_was_dirty(tmp_path):
    """build.sh's default tag: the commit, plus "-dirty-<time>" for uncommitted changes."""
    repo = tmp_path / "repo"
    (repo / "dataflow").mkdir(parents=True)
    shutil.copy(DATAFLOW / "build.sh", repo / "dataflow" / "build.sh")
    (repo / "setup.py").write_text("# v1\n")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

    def git(*argv):
        return subprocess.run(
            ["git", "-C", str(repo), *argv], check=True, capture_output=True, text=True, env=env
        ).stdout.strip()

    def tag():
        return subprocess.run(
            ["bash", str(repo / "dataflow" / "build.sh"), "tag"], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    commit = git("rev-parse", "--short=12", "HEAD")
    assert tag() == commit
    (repo / "setup.py").write_text("# v2, not committed\n")
    assert re.fullmatch(re.escape(commit) + r"-dirty-\d{8}T\d{6}Z", tag())
    git("commit", "-qam", "two")
    (repo / "new-file.py").write_text("")
    assert "-dirty-" in tag()


# -- metadata.json: what the console uses --------------------------------------------------------
def test_the_metadata_tells_the_console_what_each_parameter_is():
    metadata = json.loads((DATAFLOW / "metadata.json").read_text())
    assert metadata["streaming"] is True
    assert metadata["supportsAtLeastOnce"] is True and metadata["supportsExactlyOnce"] is True
    types = {p["name"]: p["paramType"] for p in metadata["parameters"]}
    assert types["input_subscription"] == "PUBSUB_SUBSCRIPTION"
    assert types["input_topic"] == types["dead_letter_topic"] == "PUBSUB_TOPIC"
    assert types["input"] == types["flow"] == "GCS_READ_FILE" and types["dead_letter"] == "GCS_WRITE_FILE"
    assert types["fail_bundle_on_delivery_error"] == "BOOLEAN" and types["delivery_shards"] == "NUMBER"
    [fmt] = [p for p in metadata["parameters"] if p["name"] == "input_format"]
    assert (
        fmt["paramType"] == "ENUM"
        and [o["value"] for o in fmt["enumOptions"]] == ["auto", "jsonl", "json", "avro", "dead_letter"]
        and fmt["defaultValue"] == "auto"
    )
    known = {
        "TEXT",
        "GCS_READ_FILE",
        "GCS_WRITE_FILE",
        "PUBSUB_SUBSCRIPTION",
        "PUBSUB_TOPIC",
        "ENUM",
        "BOOLEAN",
        "NUMBER",
    }
    assert set(types.values()) <= known


# -- backfills of few large files spread over the workers ----------------------------------------
@pytest.mark.parametrize(
    "pattern, fmt, spread",
    [
        ("events/*.jsonl", "auto", False),  # ReadFromText splits plain files itself
        ("events/*.ndjson", "jsonl", False),
        ("events/*.jsonl.gz", "auto", True),  # a gzip stream cannot be split
        ("events/*", "jsonl", True),  # may match .gz files
        ("events/*.json", "auto", True),  # one whole file per record
        ("events/*.avro", "auto", True),  # read whole, per file
        ("events/*.dl", "dead_letter", True),
    ],
)
def test_records_of_files_that_are_read_whole_are_reshuffled(tmp_path, pattern, fmt, spread):
    import apache_beam as beam

    from transforms.read import ReadEvents

    (tmp_path / "events").mkdir()
    for name in ("a.jsonl", "a.ndjson", "a.jsonl.gz", "a.json", "a.avro", "a.dl"):
        (tmp_path / "events" / name).write_bytes(b"")
    p = beam.Pipeline(runner="FnApiRunner")
    _ = p | ReadEvents(str(tmp_path / pattern), fmt)  # built, not run
    names = {t.unique_name for t in p.to_runner_api().components.transforms.values()}
    assert ("ReadEvents/Spread" in names) is spread
    if spread:  # right after the read, before anything is parsed
        assert any(n.startswith("ReadEvents/Spread/") for n in names)


# -- streaming batches: shards that follow the job's parallelism ---------------------------------
def test_worker_shards_follow_the_threads_that_deliver():
    """The default: one shard per worker thread (and per worker process), so the number of
    batches filling at once grows with the workers, never capped by a launch-time number."""
    import threading

    from segment_api import connection
    from transforms import batching

    seen, lock = [], threading.Lock()
    all_running = threading.Barrier(6)  # six threads alive at once, as on a busy worker

    def deliver():
        key = batching.worker_shard(None)
        with lock:
            seen.append((threading.get_ident(), key))
        if threading.current_thread() is not threading.main_thread():
            all_running.wait(timeout=10)

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deliver()
    assert len({key for _, key in seen}) == len({ident for ident, _ in seen}) == 7
    assert all(key.startswith(batching._PROCESS_SHARD + ":") for _, key in seen)
    assert connection.SendOptions().shards == connection.AUTO_SHARDS == 0
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import WalkerosOptions

    assert PipelineOptions([]).view_as(WalkerosOptions).delivery_shards == 0


_WORKERS = {"generation": "before-update"}


def _new_workers_at(marker: str):
    """In the read: when the marker event arrives, the "workers" change (an update or a scale
    event gives new processes, so new shard keys); nothing is ever sent to the old keys again."""

    def switch(payload):
        from transforms import batching

        if marker in str(payload):
            _WORKERS["generation"] = "after-update"
        batching._PROCESS_SHARD = _WORKERS["generation"]
        return payload

    return switch


def test_batches_waiting_under_shards_that_disappear_are_still_sent(endpoint, monkeypatch):
    import apache_beam as beam
    from apache_beam.testing import test_stream
    from support import event, fast, lines, request_sizes, run_pipeline, spec_for

    from segment_api.connection import AUTO_SHARDS
    from transforms import batching

    monkeypatch.setattr(batching, "_PROCESS_SHARD", "before-update")
    _WORKERS["generation"] = "before-update"
    spec = spec_for(endpoint.url, flush_at=100, flush_interval=2_000, timeout_ms=5_000)
    before = lines([event(i) for i in range(3)])
    after = lines([event(i) for i in range(3, 5)])
    stream = (
        test_stream.TestStream()
        .add_elements(before)
        .add_elements(after)  # new shards from here on: the old key gets nothing more
        .advance_processing_time(3)  # flushInterval passes: the old key's timer sends its batch
        .advance_watermark_to_infinity()
    )
    read = stream | "Workers" >> beam.Map(_new_workers_at(json.loads(after[0])["id"]))
    run_pipeline(spec, read=read, streaming=True, options=fast(clock=lambda: 0.0, shards=AUTO_SHARDS))
    assert sorted(request_sizes(endpoint)) == [2, 3]  # one batch per generation of shards
    assert len(endpoint.accepted) == 5


def test_at_least_once_streaming_mode_reaches_the_job(monkeypatch, tmp_path, capsys):
    """Dataflow's at-least-once mode is a service option: the template passes it through."""
    _without_key_in_environment(monkeypatch)
    code, job = _launch_dry(
        monkeypatch,
        [
            f"--flow={EXAMPLE_FLOW}",
            *STREAMING_PARAMETERS[:2],
            "--dataflow_service_options=streaming_mode_at_least_once",
        ],
    )
    assert code == 0, capsys.readouterr().err
    # The job environment Beam's Dataflow client sends with the job, built from the job's options.
    from apache_beam.runners.dataflow.internal import apiclient

    environment = apiclient.Environment(
        packages=[],
        options=job.options,
        environment_version="8",
        proto_pipeline_staged_url="gs://my-bucket/staging/pipeline.pb",
        proto_pipeline=job.proto_pipeline,
    )
    assert "streaming_mode_at_least_once" in list(environment.proto.service_options)


# -- the operations guide ---------------------------------------------------------------------------
def test_the_operations_guide_is_linked_and_names_real_counters():
    readme = (ROOT / "README.md").read_text()
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert "(docs/operations.md)" in readme
    for section in (
        "## Architecture",
        "## Monitoring and alerts",
        "### Update and drain",
        "## Cost against throughput",
        "## Troubleshooting",
        "## Streaming modes",
        "## The write key",
    ):
        assert section in guide, section
    # Every pipeline counter the guide tells an operator to watch is one the code counts.
    code = "\n".join(p.read_text() for d in ("pipeline", "transforms") for p in (ROOT / d).glob("*.py"))
    monitoring = guide[guide.index("## Monitoring and alerts") : guide.index("## Cost against throughput")]
    named = set(re.findall(r"`((?:dead_letter|events|inputs|requests|batch)_[a-z_]+)`", monitoring))
    assert {"dead_letter_delivery_failed", "dead_letter_rejected", "events_delivered", "inputs_read"} <= named
    for counter in named:
        stem = counter if not counter.startswith("dead_letter_") else "dead_letter_"
        assert f'"{counter}"' in code or f'"{stem}' in code or f'f"{stem}' in code, counter
    # Every dead-letter reason it lists as a counter exists.
    from decide import dead_letter

    reasons = {
        getattr(dead_letter, n) for n in dir(dead_letter) if n.isupper() and isinstance(getattr(dead_letter, n), str)
    }
    for counter in named:
        if counter.startswith("dead_letter_") and counter not in ("dead_letters_total",):
            assert counter[len("dead_letter_") :] in reasons, counter
    # Dataflow's and Pub/Sub's own metrics for lag and backlog are there.
    for metric in (
        "job/system_lag",
        "subscription/num_undelivered_messages",
        "subscription/oldest_unacked_message_age",
    ):
        assert metric in monitoring


def test_a_literal_key_launched_on_dataflow_is_warned_about_without_being_shown(monkeypatch, tmp_path, capsys):
    literal = "wk-literal-" + "9" * 12
    flow = _flow_file(tmp_path, _document(literal))
    code, _ = _launch_dry(monkeypatch, [f"--flow={flow}", *STREAMING_PARAMETERS[:2]])
    err = capsys.readouterr().err
    assert code == 0
    assert "written literally in the flow file" in err and '"$secret.SEGMENT_WRITE_KEY"' in err
    assert literal not in err
