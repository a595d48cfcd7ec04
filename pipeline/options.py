"""The pipeline's own flags, as Beam PipelineOptions (so Dataflow templates see them too)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

INPUT_FORMATS = ("auto", "jsonl", "json", "avro", "dead_letter")
DEAD_LETTER_FORMATS = ("jsonl", "avro")
# What ``run`` requires (pipeline.cli says which is missing): these flags, and one flag of each
# group. dataflow/metadata.json marks exactly REQUIRED_FLAGS as not optional.
REQUIRED_FLAGS = ("flow",)
ONE_OF_FLAGS = (("input", "input_subscription", "input_topic"), ("dead_letter", "dead_letter_topic"))


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


parse_bool.__name__ = "boolean"  # argparse names the type in its error message


def add_function_arguments(parser) -> None:
    """The flags about a flow's functions; `explain` and `validate` take them too."""
    # A value is optional (--flag, --flag=true): Flex Templates pass --name=value.
    parser.add_argument("--allow_python_functions", nargs="?", const=True, default=False,
                        type=parse_bool, metavar="true|false",
                        help="Allow \"$py:\" functions in the flow: Python expressions that run with the "
                             "worker's full rights (files, network, credentials). \"$code:\" JavaScript "
                             "functions run in a sandbox and need no flag.")
    parser.add_argument("--function_time_limit_seconds", type=float, default=1.0,
                        help="Longest one call of a flow function may run (JavaScript: CPU time of the "
                             "worker process; Python: wall time) before its value counts as a function "
                             "error.")


class WalkerosOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        flow = parser.add_argument_group("flow file")
        flow.add_argument("--flow", required=False,
                          help="Path of the walkerOS flow file (JSON, version 4), local or gs://. Required.")
        flow.add_argument("--flow_name", default=None,
                          help="Flow to run (default: the only one, else 'default').")
        flow.add_argument("--destination_id", default=None,
                          help="Destination id in the flow (default: the one whose package is "
                               "@walkeros/server-destination-segment).")
        add_function_arguments(flow)

        source = parser.add_argument_group("input")
        source.add_argument("--input", default=None,
                            help="File path or glob, local or gs:// (batch), e.g. gs://bucket/events/*.jsonl. "
                                 "Plain or .gz.")
        source.add_argument("--input_format", default="auto", choices=INPUT_FORMATS,
                            help="jsonl: one envelope per line; json: one envelope per file; avro: "
                                 "records of schemas/event.avsc; dead_letter: dead-letter JSONL files to "
                                 "replay; auto: by file extension.")
        source.add_argument("--input_subscription", default=None,
                            help="Pub/Sub subscription projects/P/subscriptions/S to read events from "
                                 "(streaming). Each message holds one event, a JSON array of events, or "
                                 "{\"batch\": [events]}. Messages with the attribute walkeros_heartbeat "
                                 "are dropped.")
        source.add_argument("--input_topic", default=None,
                            help="Pub/Sub topic projects/P/topics/T to read events from (streaming) through "
                                 "a temporary subscription: only messages published after the job starts "
                                 "are seen. Prefer --input_subscription.")
        source.add_argument("--id_label", default=None,
                            help="Pub/Sub attribute holding a unique message id: Dataflow drops messages "
                                 "whose id it has already seen (Dataflow only; the local DirectRunner "
                                 "refuses it).")
        source.add_argument("--timestamp_attribute", default=None,
                            help="Pub/Sub attribute holding the element timestamp, as milliseconds since "
                                 "the epoch or RFC 3339 (default: the publish time).")

        out = parser.add_argument_group("dead letters")
        out.add_argument("--dead_letter", default=None,
                         help="Path prefix (local or gs://) for dead-letter files. Required unless "
                              "--dead_letter_topic is given.")
        out.add_argument("--dead_letter_format", default="jsonl", choices=DEAD_LETTER_FORMATS,
                         help="Dead-letter file format.")
        out.add_argument("--dead_letter_topic", default=None,
                         help="Pub/Sub topic projects/P/topics/T for dead letters instead of files.")

        delivery = parser.add_argument_group("delivery")
        delivery.add_argument("--message_id_namespace", default=None,
                              help="Prefix of every messageId (Segment deduplicates across all sources: "
                                   "make it unique to this pipeline). Default: walkeros-<flow name>.")
        delivery.add_argument("--identity_state_ttl_hours", type=float, default=24.0,
                              help="Hours without events after which a user's identify/group memory is cleared.")
        delivery.add_argument("--flush_deadline_seconds", type=float, default=120.0,
                              help="Longest a batch may take to settle (retries included) before its events "
                                   "count as failed.")
        # A value is optional (--flag, --flag=true, --flag=false): Flex Templates pass every
        # parameter as --name=value, which a plain store_true flag refuses.
        delivery.add_argument("--fail_bundle_on_delivery_error", nargs="?", const=True, default=False,
                              type=parse_bool, metavar="true|false",
                              help="Fail the bundle (the runner retries it) instead of dead-lettering events "
                                   "Segment did not accept after retries.")
        delivery.add_argument("--delivery_shards", type=int, default=8,
                              help="Streaming: keys over which calls are batched in Beam state (flushAt / flushInterval): "
                                   "at most this many batches fill, and are sent, in parallel. Batch runs "
                                   "batch within bundles and ignore it.")
        delivery.add_argument("--progress_interval_seconds", type=float, default=30.0,
                              help="Log delivery progress (events delivered so far) at most this often; 0: never.")
