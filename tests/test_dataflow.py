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

import pytest

import emulators
from conftest_emulators import GCS_BUCKET, gcs  # noqa: F401  (pytest fixture)
from pipeline import cli
from pipeline.flow import FlowError, flow_from_document
from support import WRITE_KEY, flow_document
from transforms.secrets import WriteKey, WriteKeyUnavailable

ROOT = Path(__file__).resolve().parent.parent
DATAFLOW = ROOT / "dataflow"
EXAMPLE_FLOW = ROOT / "examples" / "flow.json"
EXAMPLE_EVENTS = ROOT / "examples" / "events.jsonl"
IMAGE = "europe-west1-docker.pkg.dev/my-project/dataflow/walkeros-segment:0123456789ab"
# What a Flex Template launch passes besides the template parameters (Dataflow's own options).
JOB_OPTIONS = ["--project=my-project", "--region=europe-west1", "--temp_location=gs://my-bucket/temp",
               "--staging_location=gs://my-bucket/staging", f"--sdk_container_image={IMAGE}"]
STREAMING_PARAMETERS = ["--input_subscription=projects/my-project/subscriptions/walkeros-events",
                        "--dead_letter_topic=projects/my-project/topics/walkeros-dead-letters",
                        "--id_label=event_id", "--message_id_namespace=acme-web-prod"]
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
    from test_packaging import _unpickled

    pipeline = job.proto_pipeline
    payloads = [t.spec.payload for t in pipeline.components.transforms.values() if t.spec.payload]
    return b"\n".join([str(job).encode(), pipeline.SerializeToString(), *[_unpickled(p) for p in payloads]])


# -- the launch ----------------------------------------------------------------------------------
@pytest.mark.parametrize("write_key", ["$env.SEGMENT_WRITE_KEY", "$secret.SEGMENT_WRITE_KEY"])
def test_the_bundled_example_launches_as_a_template_with_no_secret_in_the_launcher(
        monkeypatch, tmp_path, capsys, write_key):
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

    reads = [t for t in job.proto_pipeline.components.transforms.values()
             if t.spec.urn == "beam:transform:pubsub_read:v1"]
    assert reads and beam_runner_api_pb2.PubSubReadPayload.FromString(reads[0].spec.payload).id_attribute == "event_id"
    assert b"SEGMENT_WRITE_KEY" in _job_text(job)


def test_the_unchanged_bundled_example_launches_for_a_backfill(gcs, monkeypatch, capsys):  # noqa: F811
    """The example flow file as shipped ($env.SEGMENT_WRITE_KEY), read from gs:// as the launcher
    reads it, for a batch backfill from gs:// (the GCS emulator): no key anywhere."""
    _without_key_in_environment(monkeypatch)
    gcs.blob("launch/flow.json").upload_from_string(EXAMPLE_FLOW.read_bytes())
    gcs.blob("launch/events/part-1.jsonl").upload_from_string(EXAMPLE_EVENTS.read_bytes())
    code, job = _launch_dry(monkeypatch, [
        f"--flow=gs://{GCS_BUCKET}/launch/flow.json", f"--input=gs://{GCS_BUCKET}/launch/events/*.jsonl",
        f"--dead_letter=gs://{GCS_BUCKET}/launch/dead-letters"])
    assert code == 0, capsys.readouterr().err
    assert job.proto.type.name == "JOB_TYPE_BATCH"


def test_a_launch_with_a_secret_version_parameter_carries_its_name_only(monkeypatch, tmp_path, capsys):
    _without_key_in_environment(monkeypatch)
    code, job = _launch_dry(monkeypatch, [f"--flow={EXAMPLE_FLOW}", *STREAMING_PARAMETERS,
                                          f"--write_key_secret={SECRET_VERSION}"])
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
