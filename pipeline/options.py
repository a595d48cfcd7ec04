"""The pipeline's own flags, as Beam PipelineOptions (so Dataflow templates see them too)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

INPUT_FORMATS = ("auto", "jsonl", "json", "avro", "dead_letter")
DEAD_LETTER_FORMATS = ("jsonl", "avro")


class WalkerosOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        flow = parser.add_argument_group("flow file")
        flow.add_argument("--flow", required=False, help="Path of the walkerOS flow file (JSON, version 4). Required.")
        flow.add_argument("--flow_name", default=None,
                          help="Flow to run (default: the only one, else 'default').")
        flow.add_argument("--destination_id", default=None,
                          help="Destination id in the flow (default: the one whose package is "
                               "@walkeros/server-destination-segment).")

        source = parser.add_argument_group("input")
        source.add_argument("--input", default=None,
                            help="File path or glob, local or gs:// (batch). Plain or .gz.")
        source.add_argument("--input_format", default="auto", choices=INPUT_FORMATS,
                            help="jsonl: one envelope per line; json: one envelope per file; avro: "
                                 "records of schemas/event.avsc; dead_letter: dead-letter JSONL files to "
                                 "replay; auto: by file extension.")
        source.add_argument("--input_subscription", default=None,
                            help="Pub/Sub subscription projects/P/subscriptions/S (streaming).")
        source.add_argument("--input_topic", default=None,
                            help="Pub/Sub topic projects/P/topics/T (streaming; only sees messages "
                                 "published after the job starts).")
        source.add_argument("--id_label", default=None,
                            help="Pub/Sub attribute with a unique id, for deduplication (Dataflow only).")
        source.add_argument("--timestamp_attribute", default=None,
                            help="Pub/Sub attribute holding the element timestamp (ms since epoch or RFC 3339).")

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
        delivery.add_argument("--fail_bundle_on_delivery_error", action="store_true", default=False,
                              help="Fail the bundle (the runner retries it) instead of dead-lettering events "
                                   "Segment did not accept after retries.")
