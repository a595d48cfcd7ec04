"""The pipeline's own flags, as Beam PipelineOptions (so Dataflow templates see them too)."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.flags import (
    DEAD_LETTER_FORMATS,
    add_flow_arguments,
    add_identity_arguments,
    add_input_format_argument,
    add_outcome_argument,
    parse_bool,
)


class WalkerosOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        flow = parser.add_argument_group("flow file")
        # Not required here (a template launches with parameters); run says when it is missing.
        add_flow_arguments(flow, required=False)

        source = parser.add_argument_group("input")
        source.add_argument(
            "--input",
            default=None,
            help="File path or glob, local or gs:// (batch), e.g. gs://bucket/events/*.jsonl. Plain or .gz.",
        )
        add_input_format_argument(source)
        source.add_argument(
            "--input_subscription",
            default=None,
            help="Pub/Sub subscription projects/P/subscriptions/S to read events from "
            "(streaming). Each message holds one event, a JSON array of events, or "
            '{"batch": [events]}. Messages with the attribute walkeros_heartbeat '
            "are dropped.",
        )
        source.add_argument(
            "--input_topic",
            default=None,
            help="Pub/Sub topic projects/P/topics/T to read events from (streaming) through "
            "a temporary subscription: only messages published after the job starts "
            "are seen. Prefer --input_subscription.",
        )
        source.add_argument(
            "--id_label",
            default=None,
            help="Pub/Sub attribute holding a unique message id: Dataflow drops messages "
            "whose id it has already seen (Dataflow only; the local DirectRunner "
            "refuses it).",
        )
        source.add_argument(
            "--timestamp_attribute",
            default=None,
            help="Pub/Sub attribute holding the element timestamp, as milliseconds since "
            "the epoch or RFC 3339 (default: the publish time).",
        )

        out = parser.add_argument_group("dead letters")
        out.add_argument(
            "--dead_letter",
            default=None,
            help="Path prefix (local or gs://) for dead-letter files. Required unless --dead_letter_topic is given.",
        )
        out.add_argument(
            "--dead_letter_format", default="jsonl", choices=DEAD_LETTER_FORMATS, help="Dead-letter file format."
        )
        out.add_argument(
            "--dead_letter_topic",
            default=None,
            help="Pub/Sub topic projects/P/topics/T for dead letters instead of files.",
        )

        delivery = parser.add_argument_group("delivery")
        add_identity_arguments(delivery)
        delivery.add_argument(
            "--flush_deadline_seconds",
            type=float,
            default=120.0,
            help="Longest a batch may take to settle (retries included) before its events count as failed.",
        )
        # A value is optional (--flag, --flag=true, --flag=false): Flex Templates pass every
        # parameter as --name=value, which a plain store_true flag refuses.
        delivery.add_argument(
            "--fail_bundle_on_delivery_error",
            nargs="?",
            const=True,
            default=False,
            type=parse_bool,
            metavar="true|false",
            help="Fail the bundle (the runner retries it) instead of dead-lettering events "
            "Segment did not accept after retries.",
        )
        delivery.add_argument(
            "--delivery_shards",
            type=int,
            default=0,
            help="Streaming: keys over which calls are batched in Beam state (flushAt / flushInterval). "
            "0 (default): one per thread delivering on each worker, so the job's "
            "parallelism sets how many batches fill and are sent at once; N: N keys by "
            "user (a user's calls in one shard, in order), at most N requests in flight. "
            "Can change on update. Batch runs batch within bundles and ignore it.",
        )
        delivery.add_argument(
            "--progress_interval_seconds",
            type=float,
            default=30.0,
            help="Log delivery progress (events delivered so far) at most this often; 0: never.",
        )
        delivery.add_argument(
            "--write_key_secret",
            default=None,
            help="Secret Manager secret version holding the Segment write key, "
            "projects/PROJECT/secrets/NAME/versions/VERSION (any project; VERSION a "
            "number or latest). Workers read it; the launcher never does. Replaces "
            "the flow's $secret/$env writeKey. Never pass the key itself.",
        )

        source.add_argument(
            "--max_inflation_ratio",
            type=float,
            default=100.0,
            help="A compressed input file (.gz) that inflates beyond this many times its size "
            "(once past 64 MB) is refused as damaged: a decompression bomb never "
            "exhausts memory.",
        )
        source.add_argument(
            "--max_inflated_mb",
            type=int,
            default=16384,
            help="A compressed input file (.gz) that inflates beyond this many MB is refused as damaged.",
        )
        run = parser.add_argument_group("run outcome")
        add_outcome_argument(run)
        run.add_argument(
            "--summary_json",
            default=None,
            help="Also write the end-of-run summary as JSON to this path (local or gs://): counts "
            "by reason, the accounting, the exit status and the run's options.",
        )
        run.add_argument(
            "--run_id",
            default=None,
            help="Names this run's dead-letter files (after the --dead_letter prefix and the start "
            "time) and its summary, e.g. a scheduler's run id. Default: random.",
        )
