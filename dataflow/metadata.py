"""Writes dataflow/metadata.json, the Flex Template's parameters, from the pipeline's own flags.

Every flag of ``pipeline.options.WalkerosOptions`` becomes a parameter with its help text; only
``REQUIRED_FLAGS`` are not optional; each gets validation regexes (from its type or choices, or
the table below for paths) and the ``paramType`` the Dataflow console uses to pick a value (a
Pub/Sub or Cloud Storage browser, a list of choices, ...), as Google's own templates' metadata
does. tests/test_packaging.py fails when the file is out of date.

    python dataflow/metadata.py           # rewrite dataflow/metadata.json
    python dataflow/metadata.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decide.secrets import SECRET_VERSION  # noqa: E402 - after the path is set

METADATA = HERE / "metadata.json"

LINE = r"^[^\n\r]+$"
GCS_PATH = r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9]/[^\n\r]+$"
TOPIC = r"^projects/[a-z][-a-z0-9:.]{4,61}[a-z0-9]/topics/[a-zA-Z][-a-zA-Z0-9._~%+]{2,254}$"
SUBSCRIPTION = r"^projects/[a-z][-a-z0-9:.]{4,61}[a-z0-9]/subscriptions/[a-zA-Z][-a-zA-Z0-9._~%+]{2,254}$"
ATTRIBUTE = r"^[a-zA-Z0-9_.~%+-]{1,256}$"
NUMBER = r"^[0-9]+(\.[0-9]+)?$"
INTEGER = r"^[0-9]+$"
BOOLEAN = r"^(true|false)$"

# Flags whose type says too little: what Dataflow should accept.
REGEXES = {
    # The launcher reads the flow file: on gs://, or a path inside the template image.
    "flow": [r"^(gs://[a-z0-9][-_.a-z0-9]*[a-z0-9]/|/)[^\n\r]+$"],
    "input": [GCS_PATH],  # workers cannot read the launcher's disk
    "dead_letter": [GCS_PATH],
    "input_subscription": [SUBSCRIPTION],
    "input_topic": [TOPIC],
    "dead_letter_topic": [TOPIC],
    "id_label": [ATTRIBUTE],
    "timestamp_attribute": [ATTRIBUTE],
    "message_id_namespace": [r"^[^\s]{1,60}$"],
    "summary_json": [GCS_PATH],  # the launcher's disk is gone once the job is submitted
    "run_id": [r"^[A-Za-z0-9._=+:-]{1,100}$"],
    "max_dead_letter_ratio": [r"^(0(\.[0-9]+)?|1(\.0+)?)$"],  # a share, 0 to 1
    # A secret's name, never the key: projects/P/secrets/S/versions/(N|latest).
    "write_key_secret": [SECRET_VERSION.pattern],
}
# The console's widget for a parameter (Dataflow's ParameterType); the rest is TEXT, or follows
# the flag's type (ENUM, BOOLEAN, NUMBER).
PARAM_TYPES = {
    "flow": "GCS_READ_FILE",
    "input": "GCS_READ_FILE",
    "dead_letter": "GCS_WRITE_FILE",  # a path prefix: the files are <prefix>-<shard>...
    "input_subscription": "PUBSUB_SUBSCRIPTION",
    "input_topic": "PUBSUB_TOPIC",
    "dead_letter_topic": "PUBSUB_TOPIC",
}
LABELS = {
    "flow": "Flow file",
    "flow_name": "Flow name",
    "destination_id": "Destination id",
    "input": "Input files (batch)",
    "input_format": "Input format",
    "input_subscription": "Pub/Sub input subscription (streaming)",
    "input_topic": "Pub/Sub input topic (streaming)",
    "id_label": "Pub/Sub id attribute",
    "timestamp_attribute": "Pub/Sub timestamp attribute",
    "dead_letter": "Dead-letter files prefix",
    "dead_letter_format": "Dead-letter file format",
    "dead_letter_topic": "Dead-letter Pub/Sub topic",
    "message_id_namespace": "messageId namespace",
    "max_dead_letter_ratio": "Tolerated share of dead letters",
    "summary_json": "Run summary JSON (gs://)",
    "run_id": "Run id",
    "write_key_secret": "Write key secret version (Secret Manager)",
}
ONE_OF_NOTE = " One of {flags} is required."


def parameters() -> list[dict]:
    from pipeline.flags import ONE_OF_FLAGS, REQUIRED_FLAGS, parse_bool
    from pipeline.options import WalkerosOptions

    parser = argparse.ArgumentParser()
    WalkerosOptions._add_argparse_args(parser)
    out = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = action.dest
        help_text = " ".join((action.help or "").split())
        group = next((g for g in ONE_OF_FLAGS if name in g), None)
        if group:
            help_text += ONE_OF_NOTE.format(flags=", ".join(group))
        extra = {}
        if action.choices:
            regexes, param_type = ["^(" + "|".join(action.choices) + ")$"], "ENUM"
            extra = {
                "enumOptions": [{"value": c, "label": c} for c in action.choices],
                "defaultValue": str(action.default),
            }
        elif action.type is parse_bool:
            regexes, param_type = [BOOLEAN], "BOOLEAN"
            extra = {"defaultValue": "true" if action.default else "false"}
        elif action.type in (float, int):
            regexes, param_type = [NUMBER if action.type is float else INTEGER], "NUMBER"
            extra = {"defaultValue": str(action.default)}
        else:
            regexes, param_type = REGEXES.get(name, [LINE]), PARAM_TYPES.get(name, "TEXT")
        out.append(
            {
                "name": name,
                "label": LABELS.get(name, name.replace("_", " ").capitalize()),
                "helpText": help_text,
                "isOptional": name not in REQUIRED_FLAGS,
                "regexes": regexes,
                "paramType": param_type,
                **extra,
            }
        )
    return out


def metadata() -> dict:
    return {
        "name": "walkerOS to Segment",
        "description": (
            "Delivers walkerOS events to Segment as walkerOS's Segment destination does, mapped by a walkerOS "
            "flow file: streaming from a Pub/Sub subscription, or a batch backfill from files on GCS. Invalid "
            "input and undeliverable events go to dead letters (files or a Pub/Sub topic)."
        ),
        # Both streaming (Pub/Sub) and batch (files); in streaming, both Dataflow modes work:
        # exactly-once, and at-least-once (--dataflow_service_options=streaming_mode_at_least_once),
        # which the deterministic messageIds make safe (docs/operations.md).
        "streaming": True,
        "supportsAtLeastOnce": True,
        "supportsExactlyOnce": True,
        "parameters": parameters(),
    }


def render() -> str:
    return json.dumps(metadata(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not METADATA.exists() or METADATA.read_text(encoding="utf-8") != text:
            print(f"{METADATA} is out of date: run python dataflow/metadata.py", file=sys.stderr)
            return 1
        return 0
    METADATA.write_text(text, encoding="utf-8")
    print(f"wrote {METADATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
