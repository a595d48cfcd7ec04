"""walkeros-segment: run | explain | validate | local-segment | demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_CONFIG = 2

USAGE = """walkeros-segment COMMAND [options]

commands:
  run            run the Beam pipeline (batch from files, streaming from Pub/Sub)
  explain        show what each input event becomes, in order, with no network
  validate       check a flow file: prints "ok", or each error with its JSON path
  local-segment  a local Segment-compatible endpoint to try flows against
  demo           the bundled example end to end against a local endpoint (what `make run` does)

'walkeros-segment COMMAND --help' shows a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"run": run, "explain": explain, "validate": validate, "local-segment": local_segment, "demo": demo}
    if command not in commands:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_CONFIG
    return commands[command](rest)


# -- shared start-up -------------------------------------------------------------------------
def load_spec(flow_path: str, flow_name: str | None = None, destination_id: str | None = None,
              namespace: str | None = None, ttl_hours: float | None = 24.0):
    """Flow file → DestinationSpec, compiled once to surface every configuration error now."""
    from pipeline.flow import FlowError, load_flow
    from transforms.destination import Destination, DestinationSpec
    from transforms.mapping import MappingConfigError

    flow = load_flow(flow_path, flow_name, destination_id)
    ttl_ms = None if ttl_hours is None or ttl_hours <= 0 else int(ttl_hours * 3600 * 1000)
    spec = DestinationSpec.from_flow(flow, namespace=namespace, state_ttl_ms=ttl_ms)
    try:
        Destination(spec)
    except MappingConfigError as exc:
        raise FlowError([str(exc)]) from None
    return spec


def _flow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flow", required=True, help="walkerOS flow file")
    parser.add_argument("--flow_name", default=None, help="flow to use (default: the only one, else 'default')")
    parser.add_argument("--destination_id", default=None, help="destination id (default: the Segment one)")


def _report_flow_errors(exc) -> int:
    for error in exc.errors:
        print(error, file=sys.stderr)
    return EXIT_CONFIG


# -- commands --------------------------------------------------------------------------------
def validate(argv: list[str]) -> int:
    from pipeline.flow import FlowError

    parser = argparse.ArgumentParser(prog="walkeros-segment validate", description="Check a flow file.")
    _flow_arguments(parser)
    args = parser.parse_args(argv)
    try:
        load_spec(args.flow, args.flow_name, args.destination_id)
    except FlowError as exc:
        return _report_flow_errors(exc)
    print("ok")
    return 0


def explain(argv: list[str]) -> int:
    from pipeline.explain import dumps, explain_payloads
    from pipeline.flow import FlowError
    from pipeline.options import INPUT_FORMATS
    from pipeline.sources import iter_payloads
    from transforms.steps import compiled

    parser = argparse.ArgumentParser(
        prog="walkeros-segment explain",
        description="Each input event through the pipeline's functions, in input order, no network: "
                    "one JSON object per event.")
    _flow_arguments(parser)
    parser.add_argument("--input", required=True, help="events file or glob (local or gs://)")
    parser.add_argument("--input_format", default="auto", choices=INPUT_FORMATS)
    parser.add_argument("--message_id_namespace", default=None)
    parser.add_argument("--identity_state_ttl_hours", type=float, default=24.0)
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.flow, args.flow_name, args.destination_id, args.message_id_namespace,
                         args.identity_state_ttl_hours)
    except FlowError as exc:
        return _report_flow_errors(exc)
    try:
        payloads = iter_payloads(args.input, args.input_format)
        out = sys.stdout
        for line in explain_payloads(compiled(spec), payloads):
            out.write(dumps(line) + "\n")
    except (FileNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    return 0


def run(argv: list[str]) -> int:
    """Build and run the pipeline; batch runs wait and print the summary."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from pipeline.flow import FlowError
    from pipeline.options import WalkerosOptions

    if any(a in ("-h", "--help") for a in argv):
        WalkerosOptions(["--help"])  # argparse prints the help and exits
    options = PipelineOptions(_with_default_runner(argv))
    opts = options.view_as(WalkerosOptions)
    standard = options.view_as(StandardOptions)
    problems = _missing_flags(opts)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return EXIT_CONFIG
    if (opts.input_subscription or opts.input_topic) and not standard.streaming:
        standard.streaming = True  # Pub/Sub is unbounded: a batch pipeline could never finish
    try:
        spec = load_spec(opts.flow, opts.flow_name, opts.destination_id, opts.message_id_namespace,
                         opts.identity_state_ttl_hours)
    except FlowError as exc:
        return _report_flow_errors(exc)
    return execute(options, spec, streaming=bool(standard.streaming))


def execute(options, spec, streaming: bool) -> int:
    import apache_beam as beam

    from pipeline.graph import build_from_options
    from pipeline.options import WalkerosOptions
    from pipeline.summary import counters, render

    opts = options.view_as(WalkerosOptions)
    pipeline = beam.Pipeline(options=options)
    build_from_options(pipeline, spec, opts, streaming)
    result = pipeline.run()
    if streaming and not _is_direct(options):
        print("streaming job submitted; it runs until drained or cancelled")
        return 0
    result.wait_until_finish()
    print(f"walkerOS → Segment: run of flow {spec.flow_name!r} finished")
    print(render(counters(result)))
    return 0


def _with_default_runner(argv: list[str]) -> list[str]:
    # The default DirectRunner first tries to download Prism, which fails offline and, online,
    # silently changes semantics: name the runner unless the user did.
    if any(a == "--runner" or a.startswith("--runner=") for a in argv):
        return argv
    streaming = any(a in ("--streaming", "--input_subscription", "--input_topic") or
                    a.startswith(("--input_subscription=", "--input_topic=")) for a in argv)
    return [*argv, "--runner", "BundleBasedDirectRunner" if streaming else "FnApiRunner"]


def _is_direct(options) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner or ""
    return "Dataflow" not in str(runner)


def _missing_flags(opts) -> list[str]:
    problems = []
    if not opts.flow:
        problems.append("--flow FILE is required")
    if not (opts.input or opts.input_subscription or opts.input_topic):
        problems.append("give --input PATH (files) or --input_subscription / --input_topic (Pub/Sub)")
    if not (opts.dead_letter or opts.dead_letter_topic):
        problems.append("give --dead_letter PREFIX (files) or --dead_letter_topic TOPIC")
    return problems


def local_segment(argv: list[str]) -> int:
    from pipeline.local_segment import main as local_main

    return local_main(argv)


def demo(argv: list[str]) -> int:
    """The bundled example, end to end, with no credentials and no network."""
    from pipeline.demo import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
