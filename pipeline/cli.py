"""walkeros-segment: run | explain | validate | local-segment | demo."""
from __future__ import annotations

import argparse
import gc
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
              namespace: str | None = None, ttl_hours: float | None = 24.0, functions=None):
    """Flow file → DestinationSpec, compiled now (and kept: the graph and explain reuse it) to
    surface every configuration error before anything starts. Compiling a function only
    parses it: nothing of it runs here. ``functions`` is a FunctionPolicy (default: no Python)."""
    from pipeline.flow import FlowError
    from transforms.destination import DestinationSpec
    from transforms.functions import Functions
    from transforms.mapping import MappingConfigError, function_syntax_errors
    from transforms.steps import compiled

    flow = _read_flow(flow_path, flow_name, destination_id)
    ttl_ms = None if ttl_hours is None or ttl_hours <= 0 else int(ttl_hours * 3600 * 1000)
    spec = DestinationSpec.from_flow(flow, namespace=namespace, state_ttl_ms=ttl_ms, functions=functions)
    errors = function_syntax_errors(spec.config, spec.config_path, Functions(spec.functions))
    if errors:
        raise FlowError(errors)
    try:
        compiled(spec)
    except MappingConfigError as exc:
        raise FlowError([str(exc)]) from None
    return spec


def _read_flow(flow_path: str, flow_name: str | None, destination_id: str | None):
    """A local flow file, or one on gs:// (a Flex Template's launcher reads it from there)."""
    import json

    from pipeline.flow import FlowError, flow_from_document, load_flow

    if not flow_path.startswith("gs://"):
        return load_flow(flow_path, flow_name, destination_id)
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(flow_path, compression_type="uncompressed") as f:
            text = f.read()
    except Exception as exc:  # Beam raises its own IOError/BeamIOError flavours for gs://
        raise FlowError([f"{flow_path}: cannot read the flow file: {exc}"]) from None
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise FlowError([f"{flow_path}: not valid JSON: {getattr(exc, 'msg', exc)}{where}"]) from None
    return flow_from_document(document, flow_name, destination_id)


def _flow_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.options import add_function_arguments

    parser.add_argument("--flow", required=True, help="walkerOS flow file")
    parser.add_argument("--flow_name", default=None, help="flow to use (default: the only one, else 'default')")
    parser.add_argument("--destination_id", default=None, help="destination id (default: the Segment one)")
    add_function_arguments(parser)


def function_policy(opts):
    """The FunctionPolicy the flags ask for, or a usage problem (str)."""
    from transforms.functions import FunctionPolicy

    limit = opts.function_time_limit_seconds
    if not (limit > 0 and limit != float("inf")):
        return f"--function_time_limit_seconds must be a positive number of seconds, got {limit}"
    return FunctionPolicy(allow_python=bool(opts.allow_python_functions), time_limit_s=limit)


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
    policy = function_policy(args)
    if isinstance(policy, str):
        print(policy, file=sys.stderr)
        return EXIT_CONFIG
    try:
        load_spec(args.flow, args.flow_name, args.destination_id, functions=policy)
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
    policy = function_policy(args)
    if isinstance(policy, str):
        print(policy, file=sys.stderr)
        return EXIT_CONFIG
    try:
        spec = load_spec(args.flow, args.flow_name, args.destination_id, args.message_id_namespace,
                         args.identity_state_ttl_hours, functions=policy)
    except FlowError as exc:
        return _report_flow_errors(exc)
    try:
        payloads = iter_payloads(args.input, args.input_format)
        out = sys.stdout
        _settle_heap()
        for line in explain_payloads(compiled(spec), payloads):
            out.write(dumps(line) + "\n")
    except (FileNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    return 0


def run(argv: list[str]) -> int:
    """Build and run the pipeline. Batch on a local runner: wait and print the summary.
    Streaming on the local DirectRunner: run until Ctrl-C. On Dataflow: submit and return."""
    prepared = prepare_run(argv)
    if isinstance(prepared, int):
        return prepared
    options, spec = prepared
    from apache_beam.options.pipeline_options import StandardOptions

    return execute(options, spec, streaming=bool(options.view_as(StandardOptions).streaming))


def prepare_run(argv: list[str]):
    """``run``'s flags → ``(PipelineOptions, DestinationSpec)``, or an exit code after printing
    every problem. Names the runner when the user did not, and turns streaming on for Pub/Sub."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from pipeline.flow import FlowError
    from pipeline.options import WalkerosOptions

    if any(a in ("-h", "--help") for a in argv):
        WalkerosOptions(["--help"])  # argparse prints the help and exits
    options = PipelineOptions(_with_default_runner(argv))
    opts = options.view_as(WalkerosOptions)
    standard = options.view_as(StandardOptions)
    if (opts.input_subscription or opts.input_topic) and not standard.streaming:
        standard.streaming = True  # Pub/Sub is unbounded: a batch pipeline could never finish
    problems = _missing_flags(opts) or _flag_problems(opts, options)
    policy = function_policy(opts)
    if isinstance(policy, str):
        problems.append(policy)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return EXIT_CONFIG
    try:
        spec = load_spec(opts.flow, opts.flow_name, opts.destination_id, opts.message_id_namespace,
                         opts.identity_state_ttl_hours, functions=policy)
    except FlowError as exc:
        return _report_flow_errors(exc)
    key = spec.settings.write_key
    if _is_direct(options) and not key.resolvable_here():
        # Only Dataflow workers read the key from Secret Manager; locally it must be in the environment.
        print(f"the write key ($secret.{key.env_name}) is not set: export {key.env_name}=... for a local run",
              file=sys.stderr)
        return EXIT_CONFIG
    return options, spec


def launch(options, spec):
    """Build the graph and start it; returns the runner's PipelineResult at once."""
    import apache_beam as beam

    from apache_beam.options.pipeline_options import StandardOptions

    from pipeline.graph import build_from_options
    from pipeline.options import WalkerosOptions

    pipeline = beam.Pipeline(options=options)
    build_from_options(pipeline, spec, options.view_as(WalkerosOptions),
                       bool(options.view_as(StandardOptions).streaming))
    _settle_heap()
    return pipeline.run()


def execute(options, spec, streaming: bool) -> int:
    from pipeline.summary import counters, render

    result = launch(options, spec)
    if not _is_direct(options):
        # A Flex Template launcher must return once the job is submitted (waiting would block
        # the launch); follow the job in the console or with `gcloud dataflow jobs`.
        job_id = getattr(result, "job_id", None)
        job = f" as job {job_id()}" if callable(job_id) else ""
        print(f"{'streaming' if streaming else 'batch'} job submitted{job}; "
              + ("it runs until drained or cancelled" if streaming else "it stops when the input is read"))
        return 0
    if streaming:
        _run_local_streaming(result, options)
    else:
        result.wait_until_finish()
    print(f"walkerOS → Segment: run of flow {spec.flow_name!r} finished")
    print(render(counters(result)))
    if streaming:
        print("(Beam's counters on the local streaming DirectRunner only count each step's first bundle: "
              "the numbers above are incomplete)")
    return 0


def _run_local_streaming(result, options) -> None:
    """The streaming DirectRunner never finishes by itself: run until Ctrl-C, then cancel."""
    from pipeline.options import WalkerosOptions

    opts = options.view_as(WalkerosOptions)
    print("streaming on the local DirectRunner; Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr, flush=True)
        stop_local_streaming(result, opts.input_subscription, opts.input_topic)


def stop_local_streaming(result, subscription: str | None = None, topic: str | None = None) -> None:
    """Cancel a streaming pipeline on the DirectRunner without waiting out its idle pull.

    The DirectRunner's Pub/Sub pull blocks up to 30 s on an idle subscription and ``cancel()``
    waits for it; a heartbeat message (dropped by ReadEvents) makes that pull return at once.
    The heartbeat reaches every subscription of the topic, so it is only published to the
    emulator (``PUBSUB_EMULATOR_HOST`` set), never to a real topic other consumers may read.
    """
    from pipeline.sources import publish_heartbeat

    if os.environ.get("PUBSUB_EMULATOR_HOST") and (subscription or topic):
        try:
            publish_heartbeat(topic=topic, subscription=subscription, timeout_s=5)
        except Exception as exc:  # then the cancel just takes longer
            print(f"could not publish a heartbeat ({type(exc).__name__}: {exc}); stopping may take up to 30 s",
                  file=sys.stderr)
    else:
        print("stopping may take up to 30 s (the DirectRunner finishes its Pub/Sub pull first)", file=sys.stderr)
    result.cancel()


def _settle_heap() -> None:
    """Move what start-up built (Beam, the compiled flow) out of the garbage collector's sight.

    The per-event path allocates many short-lived dicts; without this, every collection walks
    the whole start-up heap again (measured: about a sixth of the local pipeline's CPU time).
    """
    gc.collect()
    gc.freeze()


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


def _flag_problems(opts, options) -> list[str]:
    """Combinations that would fail later, hang, or silently do something else: said now."""
    from apache_beam.options.pipeline_options import StandardOptions

    from pipeline.sources import check_pubsub_path

    problems = []
    inputs = [f for f, v in (("--input", opts.input), ("--input_subscription", opts.input_subscription),
                             ("--input_topic", opts.input_topic)) if v]
    if len(inputs) > 1:
        problems.append(f"give one input, not {' and '.join(inputs)}")
    if opts.dead_letter and opts.dead_letter_topic:
        problems.append("give --dead_letter or --dead_letter_topic, not both")
    for flag, kind, value in (("--input_subscription", "subscription", opts.input_subscription),
                              ("--input_topic", "topic", opts.input_topic),
                              ("--dead_letter_topic", "topic", opts.dead_letter_topic)):
        problem = value and check_pubsub_path(kind, value)
        if problem:
            problems.append(f"{flag}: {problem}")
    pubsub = bool(opts.input_subscription or opts.input_topic)
    if not pubsub and (opts.id_label or opts.timestamp_attribute):
        problems.append("--id_label and --timestamp_attribute apply to Pub/Sub input only "
                        "(--input_subscription / --input_topic)")
    runner = str(options.view_as(StandardOptions).runner or "")
    if _is_direct(options):
        if pubsub and opts.id_label:
            problems.append(
                "--id_label is supported on Dataflow only: the local DirectRunner cannot deduplicate on a "
                "Pub/Sub attribute (Beam's reader raises NotImplementedError once the pipeline runs). "
                "Drop --id_label to run locally, or run on Dataflow (--runner DataflowRunner).")
        if pubsub and "FnApiRunner" in runner:
            problems.append("--runner FnApiRunner cannot read Pub/Sub (the pipeline hangs without an error): "
                            "use --runner BundleBasedDirectRunner (the default for Pub/Sub input), or Dataflow")
    else:
        # Workers only see Cloud Storage, not the disk of the machine that launched the job.
        for flag, value in (("--input", opts.input), ("--dead_letter", opts.dead_letter)):
            if value and not value.startswith("gs://"):
                problems.append(f"{flag} {value}: on {runner or 'this runner'} files must be on gs:// "
                                "(the workers cannot read this machine's disk)")
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
