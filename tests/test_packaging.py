"""Ready to deploy: the Flex Template's metadata.json matches the pipeline's flags, the image
recipe matches the package, setup.py works as Beam's --setup_file, and the built wheel installs
into a clean virtual environment where the command runs (outside this repository).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from support import WRITE_KEY, pickled_code

from pipeline.flags import ONE_OF_FLAGS, REQUIRED_FLAGS
from pipeline.options import WalkerosOptions

ROOT = Path(__file__).resolve().parent.parent
DATAFLOW = ROOT / "dataflow"
METADATA = json.loads((DATAFLOW / "metadata.json").read_text())
EXAMPLE_FLOW = ROOT / "examples" / "flow.json"
EXAMPLE_EVENTS = ROOT / "examples" / "events.jsonl"

# A value for every parameter, as a Flex Template launch would pass it (--name=value).
SAMPLES = {
    "flow": "gs://my-bucket/flows/flow.json",
    "flow_name": "default",
    "destination_id": "segment",
    "allow_python_functions": "false",
    "function_time_limit_seconds": "0.5",
    "input": "gs://my-bucket/events/2026/*/*.jsonl.gz",
    "input_format": "jsonl",
    "input_subscription": "projects/my-project/subscriptions/walkeros-events",
    "input_topic": "projects/my-project/topics/walkeros-events",
    "id_label": "event_id",
    "timestamp_attribute": "event_ts",
    "dead_letter": "gs://my-bucket/dead-letters/walkeros",
    "dead_letter_format": "avro",
    "dead_letter_topic": "projects/my-project/topics/walkeros-dead-letters",
    "message_id_namespace": "acme-web",
    "identity_state_ttl_hours": "48",
    "flush_deadline_seconds": "90.5",
    "fail_bundle_on_delivery_error": "true",
    "delivery_shards": "16",
    "progress_interval_seconds": "30",
    "max_inflation_ratio": "100",
    "max_inflated_mb": "16384",
    "max_dead_letter_ratio": "0.01",
    "summary_json": "gs://my-bucket/reports/walkeros-run.json",
    "run_id": "scheduled__2026-01-01T00_00_00",
    "write_key_secret": "projects/other-project/secrets/segment-write-key/versions/3",
}
# Values Dataflow must refuse before launching.
REFUSED = {
    "flow": ["flow.json", "http://example.com/flow.json"],
    "input": ["/local/events.jsonl", "gs://", "gs://bucket"],
    "input_subscription": ["my-sub", "projects/my-project/topics/t-1"],
    "input_topic": ["projects/p/topics/t-1", "topics/walkeros"],
    "dead_letter_topic": ["projects/my-project/subscriptions/s-1"],
    "input_format": ["csv"],
    "fail_bundle_on_delivery_error": ["yes please"],
    "allow_python_functions": ["maybe"],
    "identity_state_ttl_hours": ["-1", "a day"],
    "max_dead_letter_ratio": ["1.5", "-0.1", "all"],
    "write_key_secret": ["sk_live_0123456789", "projects/p/secrets/s", "projects/p/secrets/s/versions/0"],
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    WalkerosOptions._add_argparse_args(parser)
    return parser


def _flags() -> dict[str, argparse.Action]:
    return {a.dest: a for a in _parser()._actions if a.option_strings and a.dest != "help"}


def _load_dataflow_module(name: str):
    spec = importlib.util.spec_from_file_location(f"dataflow_{name}", DATAFLOW / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- metadata.json -----------------------------------------------------------------------------
def test_metadata_parameters_are_exactly_the_pipeline_flags():
    names = [p["name"] for p in METADATA["parameters"]]
    assert len(names) == len(set(names))
    assert set(names) == set(_flags()), "regenerate it: python dataflow/metadata.py"
    for required in REQUIRED_FLAGS:
        assert required in names
    assert {p["name"] for p in METADATA["parameters"] if not p["isOptional"]} == set(REQUIRED_FLAGS)
    for group in ONE_OF_FLAGS:
        for name in group:
            [param] = [p for p in METADATA["parameters"] if p["name"] == name]
            assert "One of " + ", ".join(group) + " is required." in param["helpText"]
    assert METADATA["name"] and METADATA["description"]


def test_metadata_is_generated_from_the_current_flags():
    generator = _load_dataflow_module("metadata")
    assert (DATAFLOW / "metadata.json").read_text() == generator.render(), (
        "dataflow/metadata.json is out of date: run python dataflow/metadata.py"
    )


@pytest.mark.parametrize("param", METADATA["parameters"], ids=lambda p: p["name"])
def test_every_parameter_is_accepted_by_the_option_parser(param):
    name = param["name"]
    assert param["label"].strip() and param["helpText"].strip()
    assert param["helpText"] == " ".join((_flags()[name].help or "").split()) or param["helpText"].startswith(
        " ".join((_flags()[name].help or "").split())
    )
    regexes = [re.compile(r) for r in param["regexes"]]
    # Dataflow checks these in Java: keep to the syntax both share.
    assert all("(?P" not in r and "(?<" not in r for r in param["regexes"])
    assert name in SAMPLES, f"add a sample value for the new parameter {name!r} to SAMPLES"
    value = SAMPLES[name]
    assert all(r.search(value) for r in regexes), (name, value)
    for bad in REFUSED.get(name, []):
        assert not all(r.search(bad) for r in regexes), (name, bad)

    argv = [f"--{name}={value}"]
    _, unknown = _parser().parse_known_args(argv)
    assert unknown == []
    parsed = getattr(PipelineOptions(argv).view_as(WalkerosOptions), name)
    action = _flags()[name]
    expected = action.type(value) if callable(action.type) else value
    assert parsed == expected


def test_a_template_launch_with_every_batch_parameter_runs(endpoint, monkeypatch, tmp_path, capsys):
    """dataflow/launch.py as the launcher runs it (--name=value), on a local runner."""
    launch = _load_dataflow_module("launch")
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)
    code = launch.main(
        [
            f"--flow={EXAMPLE_FLOW}",
            "--flow_name=default",
            "--destination_id=segment",
            f"--input={EXAMPLE_EVENTS}",
            "--input_format=jsonl",
            f"--dead_letter={tmp_path / 'dead'}",
            "--dead_letter_format=jsonl",
            "--message_id_namespace=example",
            "--identity_state_ttl_hours=24",
            "--flush_deadline_seconds=60",
            "--fail_bundle_on_delivery_error=false",
            "--max_dead_letter_ratio=0.5",
            f"--summary_json={tmp_path / 'summary.json'}",
            "--run_id=template-test",
            "--runner=FnApiRunner",
        ]
    )
    assert code == 0, capsys.readouterr().err  # the example's 3 dead letters of 13 are within 0.5
    assert endpoint.accepted and list(tmp_path.glob("dead-*-template-test*.jsonl"))
    assert (tmp_path / "summary.json").exists()


def test_the_launcher_runs_on_dataflow_unless_told_otherwise(monkeypatch):
    launch = _load_dataflow_module("launch")
    seen = []
    monkeypatch.setattr(launch, "cli_main", lambda argv: seen.append(argv) or 0)
    assert launch.main(["--flow=gs://b/f.json", "--sdk_container_image=img"]) == 0
    assert seen == [["run", "--flow=gs://b/f.json", "--sdk_container_image=img", "--runner=DataflowRunner"]]


def test_the_pubsub_read_dataflow_receives(monkeypatch):
    """What the job graph says about the Pub/Sub read: subscription, attributes on, id_label
    passed through (Dataflow's own reader implements it). The timestamp attribute is read by the
    pipeline's own step (ReadEvents/EventTime): in a reader, one bad value fails the whole pull."""
    import apache_beam as beam
    from apache_beam.portability.api import beam_runner_api_pb2

    from pipeline import cli
    from pipeline.graph import build_from_options

    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    subscription = "projects/my-project/subscriptions/walkeros-events"
    options, spec = cli.prepare_run(
        [
            "--flow",
            str(EXAMPLE_FLOW),
            "--input_subscription",
            subscription,
            "--id_label",
            "event_id",
            "--timestamp_attribute",
            "event_ts",
            "--dead_letter_topic",
            "projects/my-project/topics/dead-letters",
            "--runner",
            "DataflowRunner",
            "--project",
            "my-project",
            "--region",
            "europe-west1",
            "--temp_location",
            "gs://my-bucket/temp",
        ]
    )
    assert options.view_as(beam.options.pipeline_options.StandardOptions).streaming
    # Built for a local runner: the graph is the same, and nothing reaches out to Google Cloud.
    p = beam.Pipeline(runner="BundleBasedDirectRunner", options=options)
    build_from_options(p, spec, options.view_as(WalkerosOptions), streaming=True)
    graph = p.to_runner_api()
    [read] = [t for t in graph.components.transforms.values() if t.spec.urn == "beam:transform:pubsub_read:v1"]
    payload = beam_runner_api_pb2.PubSubReadPayload.FromString(read.spec.payload)
    assert read.unique_name == "ReadEvents/ReadPubSub/Read"
    assert (payload.subscription, payload.id_attribute, payload.timestamp_attribute, payload.with_attributes) == (
        subscription,
        "event_id",
        "",
        True,
    )
    assert "ReadEvents/EventTime" in {t.unique_name for t in graph.components.transforms.values()}
    # The operations guide's "Update and drain" lists the step names an update matches on: they must be these.
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "operations.md").read_text()
    names = {t.unique_name for t in graph.components.transforms.values() if t.unique_name}
    for name in sorted(n for n in names if n.count("/") <= 1 and not n.startswith("ref_")):
        assert f"`{name.rsplit('/', 1)[-1]}`" in docs, f"docs/operations.md does not name the step {name}"


# -- the image -------------------------------------------------------------------------------
def test_dockerfile_matches_the_package(tmp_path):
    dockerfile = (DATAFLOW / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    setup_py = (ROOT / "setup.py").read_text()
    beam_pin = re.search(r'"apache-beam\[gcp\]==([\d.]+)"', setup_py).group(1)
    assert args["BEAM_VERSION"] == beam_pin
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "python311-template-launcher-base" in args["LAUNCHER_IMAGE"]
    assert re.search(
        r"^FROM --platform=linux/amd64 apache/beam_python\$\{PYTHON_VERSION\}_sdk:\$\{BEAM_VERSION\}$", dockerfile, re.M
    )
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile

    # Everything it copies is in the build context build.sh assembles, and the files the
    # launcher is pointed at are among what it copies.
    context = tmp_path / "context"
    subprocess.run(["bash", str(DATAFLOW / "build.sh"), "context", str(context)], check=True)
    copied = {}
    for sources, target in re.findall(r"^COPY (?!--from)(.+) (\S+)$", dockerfile, re.M):
        for source in sources.split():
            assert (context / source).exists(), f"COPY {source}: not in the build context"
            destination = Path("/template") / target if not target.startswith("/") else Path(target)
            copied[source] = destination / Path(source).name if target.endswith("/") else destination
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", dockerfile, re.M))
    assert Path(env["FLEX_TEMPLATE_PYTHON_PY_FILE"]) == copied["dataflow/launch.py"]
    # No FLEX_TEMPLATE_PYTHON_SETUP_FILE: the image is the workers' SDK container (tests/test_dataflow.py).
    assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in env and "setup.py" in copied
    assert not list(context.rglob("test_*.py")) and not (context / ".venv").exists()


def test_setup_py_works_as_beams_setup_file(tmp_path):
    """What a Dataflow launch does with --setup_file: Beam builds an sdist to stage for workers."""
    from apache_beam.runners.portability.stager import Stager

    context = tmp_path / "context"
    subprocess.run(["bash", str(DATAFLOW / "build.sh"), "context", str(context)], check=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    options = PipelineOptions(["--setup_file", str(context / "setup.py")])
    resources = Stager.create_job_resources(options, str(staging), log_submission_env_dependencies=False)
    assert any(b"workflow.tar.gz" in r.role_payload for r in resources)  # staged for the workers
    [tarball] = staging.glob("*.tar.gz")
    with tarfile.open(tarball) as archive:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in archive.getnames()}
    for module in (
        "pipeline/cli.py",
        "pipeline/graph.py",
        "transforms/send.py",
        "decide/wire.py",
        "segment_api/connection.py",
        "schemas/__init__.py",
        "local_segment/__init__.py",
    ):
        assert module in names
    for schema in ("flow.schema.json", "event.avsc", "dead_letter.avsc", "mapping.schema.json"):
        assert f"schemas/{schema}" in names, f"schemas/{schema} is not in the staged package"


# -- the wheel in a clean virtual environment -------------------------------------------------
def test_the_wheel_installs_into_a_clean_venv_and_runs(tmp_path):
    """Build the wheel from the build context (so the repository is left untouched), install it
    with no dependencies into a new venv that sees the project venv's site-packages for the
    dependencies only (a .pth path line: their .pth files, and so this repository's editable
    install, are not processed), and run the installed command from outside the repository."""
    started = time.monotonic()
    context = tmp_path / "context"
    subprocess.run(["bash", str(DATAFLOW / "build.sh"), "context", str(context)], check=True)
    wheels = tmp_path / "wheels"
    # Offline when this venv can build wheels itself; else pip fetches setuptools into an
    # isolated build environment (from the package index, as any `pip wheel .` does).
    offline = ["--no-build-isolation"] if _can_build_wheels() else []
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            *offline,
            "-w",
            str(wheels),
            str(context),
        ],
        cwd=tmp_path,
        timeout=420,  # most of it compiling the decide layer twice, profile-guided (3 minutes on two cores)
    )
    [wheel] = list(wheels.glob("walkeros_segment_beam-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # the licence travels with the code
        names = archive.namelist()
        assert any(".dist-info/" in name and name.endswith("/LICENSE") for name in names)
    # The decide layer compiled, with the record of what it was compiled from (and its source).
    assert "decide/compiled.json" in names and "decide/mapping.py" in names
    assert len([n for n in names if n.startswith("decide/") and n.endswith(".so")]) == len(
        [n for n in names if n.startswith("decide/") and n.endswith(".py") and n != "decide/__init__.py"]
    )

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip()
    )
    (site / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        cwd=tmp_path,
        timeout=120,
    )

    command = venv / "bin" / "walkeros-segment"
    assert command.exists()
    where = _run(
        [
            str(python),
            "-c",
            "import decide, pipeline, schemas, transforms, local_segment; "
            "print(decide.__file__, pipeline.__file__, schemas.__file__, transforms.__file__, local_segment.__file__)",
        ],
        cwd=tmp_path,
    )
    assert all(path.startswith(str(site)) for path in where.split()), where
    compiled = _run(
        [
            str(python),
            "-c",
            "import decide; print(decide.STALE, all(decide.compiled_modules().values()), decide.profile_guided())",
        ],
        cwd=tmp_path,
    )
    assert compiled.split() == ["[]", "True", "True"]  # built as the image builds it: trained, then compiled

    assert "commands:" in _run([str(command), "--help"], cwd=tmp_path)
    assert "--input_subscription" in _run([str(command), "run", "--help"], cwd=tmp_path)
    flow = tmp_path / "flow.json"
    flow.write_text(EXAMPLE_FLOW.read_text())
    # validate needs the JSON Schemas: they must have shipped inside the wheel.
    assert (
        _run([str(command), "validate", "--flow", str(flow)], cwd=tmp_path, env={"SEGMENT_WRITE_KEY": "k"}).strip()
        == "ok"
    )
    # demo finds the example flow and events the wheel installed (no checkout here).
    demo = _run([str(command), "demo", "--out", str(tmp_path / "demo")], cwd=tmp_path, timeout=120)
    assert "the endpoint accepted" in demo
    assert "share/walkeros-segment/examples/flow.json" in demo
    assert time.monotonic() - started < 480


def _can_build_wheels() -> bool:
    """setuptools builds wheels by itself from 70.1 on; older ones need the wheel package."""
    import setuptools

    if importlib.util.find_spec("wheel") is not None:
        return True
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


def _run(argv: list, cwd: Path, timeout: float = 60, env: dict | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})}
    )
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- the write key in the job graph ------------------------------------------------------------
def test_the_write_key_is_not_in_the_job_graph(monkeypatch):
    """Only the reference ($env.SEGMENT_WRITE_KEY) travels; workers resolve it in setup()."""
    import apache_beam as beam

    from pipeline import cli
    from pipeline.graph import build_from_options

    secret = "wk-" + "5ecret" * 4
    monkeypatch.setenv("SEGMENT_WRITE_KEY", secret)
    prepared = cli.prepare_run(
        ["--flow", str(EXAMPLE_FLOW), "--input", str(EXAMPLE_EVENTS), "--dead_letter", "/tmp/unused"]
    )
    options, spec = prepared
    p = beam.Pipeline(options=options)
    build_from_options(p, spec, options.view_as(WalkerosOptions), streaming=False)
    graph = p.to_runner_api()
    payloads = [t.spec.payload for t in graph.components.transforms.values() if t.spec.payload]
    assert payloads
    texts = [graph.SerializeToString(), *[pickled_code(x) for x in payloads]]
    assert not any(secret.encode() in text for text in texts)
