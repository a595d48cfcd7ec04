"""walkeros-segment: run | explain | validate | local-segment | demo."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
from pathlib import Path

from pipeline.local_workers import TRACEBACK

EXIT_CONFIG = 2  # usage and configuration errors: pipeline.summary.EXIT_USAGE (not imported: no Beam here)

USAGE = """walkeros-segment COMMAND [options]

commands:
  run            run the Beam pipeline (batch from files, streaming from Pub/Sub)
  explain        show what each input event becomes, in order, with no network
  validate       check a flow file: prints "ok", or each error with its JSON path
  local-segment  a local Segment-compatible endpoint to try flows against
  demo           the bundled example end to end against a local endpoint (what `make run` does)

'walkeros-segment COMMAND --help' shows a command's options; 'walkeros-segment --version' the version."""

DISTRIBUTION = "walkeros-segment-beam"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        import decide

        print(f"walkeros-segment {version()} (decide layer: {decide.how_it_was_built()})")
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"run": run, "explain": explain, "validate": validate, "local-segment": local_segment, "demo": demo}
    if command not in commands:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_CONFIG
    return commands[command](rest)


def version() -> str:
    """The installed distribution's version; from a checkout that was never installed, the one
    setup.py declares (so a version is never made up in two places)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return _declared_version(Path(__file__).resolve().parent.parent / "setup.py")


def _declared_version(setup_py: Path) -> str:
    import re

    try:
        found = re.search(r'^\s*version\s*=\s*"([^"]+)"', setup_py.read_text(), re.M)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


# -- shared start-up -------------------------------------------------------------------------
def load_spec(
    flow_path: str,
    flow_name: str | None = None,
    destination_id: str | None = None,
    namespace: str | None = None,
    ttl_hours: float | None = 24.0,
    functions=None,
    **key_options,
):
    """Flow file → DestinationSpec, compiled now (and kept: the graph and explain reuse it) to
    surface every configuration error before anything starts. Compiling a function only
    parses it: nothing of it runs here. ``functions`` is a FunctionPolicy (default: no Python);
    ``key_options`` go to :func:`decide.flow.flow_from_document` (where the write key is resolved)."""
    from decide.destination import DestinationSpec, compiled
    from decide.flow import FlowError
    from decide.functions import Functions
    from decide.mapping import MappingConfigError, function_syntax_errors

    flow = _read_flow(flow_path, flow_name, destination_id, **key_options)
    for notice in flow.notices:
        print(notice, file=sys.stderr)
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


def _read_flow(flow_path: str, flow_name: str | None, destination_id: str | None, **key_options):
    """A local flow file, or one on gs:// (a Flex Template's launcher reads it from there)."""
    import json

    from decide.flow import FlowError, flow_from_document, load_flow

    if not flow_path.startswith("gs://"):
        return load_flow(flow_path, flow_name, destination_id, **key_options)
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
    return flow_from_document(document, flow_name, destination_id, **key_options)


def function_policy(opts):
    """The FunctionPolicy the flags ask for (their values are checked with the other ranges)."""
    from decide.functions import FunctionPolicy

    return FunctionPolicy(allow_python=bool(opts.allow_python_functions), time_limit_s=opts.function_time_limit_seconds)


def _replay_refused(pattern: str | None, input_format: str, spec) -> bool:
    """Dead letters are replayed by the flow and namespace that wrote them (pipeline.replay)."""
    if not pattern or input_format != "dead_letter":
        return False
    from pipeline.replay import replay_problem

    problem = replay_problem(pattern, spec.flow_name, spec.namespace)
    if problem:
        print(problem, file=sys.stderr)
    return bool(problem)


def _report_flow_errors(exc) -> int:
    for error in exc.errors:
        print(error, file=sys.stderr)
    return EXIT_CONFIG


class _UsageError(Exception):
    pass


def _one_line_errors(parser_class: type) -> type:
    """``parser_class`` whose errors are one line (raised as :class:`_UsageError`), not argparse's
    usage block (Beam's lists every option it has: 150 lines for one bad value)."""

    class OneLine(parser_class):
        def error(self, message):
            raise _UsageError(message)

    return OneLine


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    # No abbreviations: a prefix of a flag would silently stand for it (Beam's parser refuses them too).
    return _one_line_errors(argparse.ArgumentParser)(prog=prog, description=description, allow_abbrev=False)


def _parse(parser: argparse.ArgumentParser, argv: list[str]):
    """The parsed flags, or the usage exit status after saying which flags are unknown (before
    argparse's own complaints: a misspelt required flag is first of all misspelt)."""
    known = [o for a in parser._actions for o in a.option_strings]
    unknown = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
    problems = unknown_flag_problems(unknown, known)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    try:
        return parser.parse_args(argv)
    except _UsageError as exc:
        print(f"{parser.prog}: {exc} (see --help)", file=sys.stderr)
        return EXIT_CONFIG


def unknown_flag_problems(unknown: list[str], known: list[str]) -> list[str]:
    """One line for each flag no parser knows, with the closest known flag when there is one;
    the value that follows an unknown flag is not reported again."""
    import difflib

    problems = []
    value_of_unknown = False
    for arg in unknown:
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            guess = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            problems.append(
                f"unknown flag {name}" + (f": did you mean {guess[0]}?" if guess else " (see --help for the flags)")
            )
            value_of_unknown = "=" not in arg
        elif value_of_unknown:
            value_of_unknown = False
        else:
            problems.append(
                f"unexpected argument {arg!r}: give each value after its flag (--name value or "
                "--name=value); a flag such as --streaming takes none"
            )
    return problems


def beam_flag_problems(argv: list[str]) -> list[str]:
    """``run`` passes unknown flags on to Beam, which only logs a warning for the ones it does not
    know either (a misspelt --num_workers would silently run with the default): every flag must be
    ours or one of Beam's."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _one_line_errors(_BeamArgumentParser)(prog="walkeros-segment run", allow_abbrev=False)
    classes: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options does
    try:
        _, unknown = parser.parse_known_args(argv)
    except _UsageError as exc:  # a known flag with a value it refuses
        return [f"walkeros-segment run: {exc}"]
    return unknown_flag_problems(unknown, [o for a in parser._actions for o in a.option_strings])


# -- commands --------------------------------------------------------------------------------
def validate(argv: list[str]) -> int:
    from decide.flow import FlowError
    from pipeline.flags import add_flow_arguments, range_problems

    parser = _parser("walkeros-segment validate", "Check a flow file.")
    add_flow_arguments(parser)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    problems = range_problems(args)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    try:
        load_spec(args.flow, args.flow_name, args.destination_id, functions=function_policy(args))
    except FlowError as exc:
        return _report_flow_errors(exc)
    print("ok")
    return 0


def explain(argv: list[str]) -> int:
    from decide.destination import DEAD_LETTER, compiled
    from decide.flow import FlowError
    from pipeline.explain import dumps, explain_payloads, stdin_payloads
    from pipeline.flags import (
        add_flow_arguments,
        add_identity_arguments,
        add_input_format_argument,
        add_outcome_argument,
        range_problems,
    )
    from pipeline.summary import EXIT_FAILED, EXIT_USAGE, Outcome, decide
    from transforms.files import input_problem, iter_payloads

    parser = _parser(
        "walkeros-segment explain",
        "Each input event through the pipeline's functions, in input order, no network: "
        "one JSON object per event. Exit status as for run: 3 when an event would be dead-lettered.",
    )
    add_flow_arguments(parser)
    parser.add_argument("--input", required=True, help="events file or glob (local or gs://), or - for standard input")
    add_input_format_argument(parser)
    add_identity_arguments(parser)
    add_outcome_argument(parser)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    problems = range_problems(args)
    if args.input != "-":
        from pipeline import local_files

        local_files.install()  # before the input is matched
        problems += [p for p in [input_problem(args.input, args.input_format, format_by_file=True)] if p]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = load_spec(
            args.flow,
            args.flow_name,
            args.destination_id,
            args.message_id_namespace,
            args.identity_state_ttl_hours,
            functions=function_policy(args),
        )
    except FlowError as exc:
        return _report_flow_errors(exc)
    if args.input != "-" and _replay_refused(args.input, args.input_format, spec):
        return EXIT_USAGE
    events = dead = 0
    damaged = []
    try:
        if args.input == "-":
            payloads = stdin_payloads(sys.stdin.buffer, args.input_format)
        else:
            payloads = iter_payloads(args.input, args.input_format, on_damage=damaged.append)
        out = sys.stdout
        _settle_heap()
        for line in explain_payloads(compiled(spec), payloads):
            events += 1
            dead += line["outcome"] == DEAD_LETTER
            out.write(dumps(line) + "\n")
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    for damage in damaged:
        print(damage.line(), file=sys.stderr)
    if damaged:  # a file not read to its end: what it held past the damage was never explained
        outcome = Outcome(EXIT_FAILED, f"{len(damaged)} input file(s) truncated or corrupt, read up to the damage")
    else:
        outcome = decide(dead, events, args.max_dead_letter_ratio, done="would end as")
    print(f"explain: {outcome.line()}", file=sys.stderr)
    return outcome.status


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

    from decide.flow import FlowError
    from pipeline.flags import range_problems
    from pipeline.options import WalkerosOptions

    if any(a in ("-h", "--help") for a in argv):
        WalkerosOptions(["--help"])  # argparse prints the help and exits
    unknown = beam_flag_problems(argv)
    if unknown:
        for problem in unknown:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    options = PipelineOptions(_with_default_runner(argv))
    opts = options.view_as(WalkerosOptions)
    standard = options.view_as(StandardOptions)
    if (opts.input_subscription or opts.input_topic) and not standard.streaming:
        standard.streaming = True  # Pub/Sub is unbounded: a batch pipeline could never finish
    problems = _missing_flags(opts) or _flag_problems(opts, options) + range_problems(opts)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return EXIT_CONFIG
    # The flow file and the input are checked together: every mistake is said at once.
    problems = []
    spec = None
    local = _is_direct(options)
    if local:
        from pipeline import local_files

        local_files.install()  # before the input is matched
    try:
        # On Dataflow the key is resolved by the workers only: the launcher never needs it.
        spec = load_spec(
            opts.flow,
            opts.flow_name,
            opts.destination_id,
            opts.message_id_namespace,
            opts.identity_state_ttl_hours,
            functions=function_policy(opts),
            defer_write_key=not local,
            write_key_secret=opts.write_key_secret,
        )
    except FlowError as exc:
        problems += exc.errors
    if spec is not None and _replay_refused(opts.input, opts.input_format, spec):
        return EXIT_CONFIG
    key = spec.settings.write_key if spec is not None else None
    if key is not None and local:
        problem = _local_write_key_problem(key)
        if problem:
            problems.append(problem)
    elif key is not None and key.env_name is None and key.secret_version is None:
        print(
            "warning: the write key is written literally in the flow file, so it travels inside the job "
            'Dataflow stores and shows; write "$secret.SEGMENT_WRITE_KEY" in the flow (or use '
            "--write_key_secret) so that only workers ever read it",
            file=sys.stderr,
        )
    problems += _input_problems(opts)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return EXIT_CONFIG
    _name_this_run(opts)
    if local and not standard.streaming:
        from pipeline.local_workers import use_workers

        choice = use_workers(argv, options, opts.input, opts.input_format)
        if choice is not None:
            print(choice.line(), file=sys.stderr)
    return options, spec


def _input_problems(opts) -> list[str]:
    """Inputs that match nothing, or that cannot be read, are the user's mistake: said now, in
    one line, rather than as a Beam traceback (or a run that "succeeds" on no input)."""
    from transforms.files import input_problem

    if not opts.input:
        return []
    if opts.input == "-":
        return ["--input -: standard input is read by explain only; run reads files (or Pub/Sub)"]
    problem = input_problem(opts.input, opts.input_format)
    return [problem] if problem else []


def _name_this_run(opts) -> None:
    """Give the run its id (the start time, then --run_id or a random suffix), and its
    dead-letter files their own name under the prefix: a run never replaces the dead letters of
    an earlier run at the same prefix, and a glob on the prefix finds every run's."""
    from transforms.dead_letters import new_run_id, run_prefix

    opts.run_id = new_run_id(opts.run_id)
    if opts.dead_letter:
        opts.dead_letter = run_prefix(opts.dead_letter, opts.run_id)


def _local_write_key_problem(key) -> str | None:
    """A local run resolves the key now, so a key that cannot be right stops it before anything
    is read (on Dataflow the workers resolve it, and fail their setup with the same message)."""
    from decide.secrets import WriteKeyUnavailable

    if key.secret_version is None and not key.resolvable_here():
        # Only Dataflow workers read $secret.NAME from Secret Manager; locally it comes from the environment.
        return f"the write key ($secret.{key.env_name}) is not set: export {key.env_name}=... for a local run"
    try:
        key.reveal()
    except WriteKeyUnavailable as exc:
        return str(exc)
    return None


def launch(options, spec):
    """Build the graph and start it; returns the runner's PipelineResult at once."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import StandardOptions

    from pipeline.graph import build_from_options
    from pipeline.local_workers import local_runner
    from pipeline.options import WalkerosOptions

    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    build_from_options(
        pipeline,
        spec,
        options.view_as(WalkerosOptions),
        bool(options.view_as(StandardOptions).streaming),
        local=_is_direct(options),
    )
    _settle_heap()
    return pipeline.run()


def execute(options, spec, streaming: bool) -> int:
    """Run, then say how it ended: the summary, one line with the exit status that applies (docs/operations.md,
    "Exit status and summary"), and the same as JSON with --summary_json. A pipeline failure is
    one line (the error's own message and the step), never a traceback."""
    from pipeline.options import WalkerosOptions
    from pipeline.summary import EXIT_FAILED, EXIT_OK, counters, render, run_outcome

    opts = options.view_as(WalkerosOptions)
    if not _is_direct(options):
        return _submit(options, spec, streaming)
    from pipeline.local_workers import limit_malloc_arenas

    limit_malloc_arenas()  # before the runner starts its threads
    result, failure, stopped = None, None, False
    with _one_line_failures(), _sigterm_as_interrupt():
        try:
            if streaming:
                from pipeline import local_streaming

                local_streaming.install()
                local_streaming.start()
            result = launch(options, spec)
            if streaming:
                stopped = not _run_local_streaming(result, opts)
            else:
                result.wait_until_finish()
        except KeyboardInterrupt:
            stopped = True
        except Exception as exc:  # the pipeline failed: said in one line below
            if _caused_by_interrupt(exc):  # a runner re-raised the Ctrl-C/SIGTERM as a step's error
                stopped = True
            else:
                failure = describe_failure(exc)
    counts = counters(result) if result is not None else {}
    outcome = run_outcome(counts, opts.max_dead_letter_ratio, failure, stopped)
    ended = "failed" if failure else "was stopped" if stopped else "finished"
    print(f"walkerOS → Segment: run {opts.run_id} of flow {spec.flow_name!r} {ended}")
    if result is not None:
        print(render(counts))
    where = _dead_letter_location(opts)
    print(f"  {'dead letters in':<23}{where}")
    print(outcome.line())
    if failure:
        print(f"run failed: {failure}", file=sys.stderr)
    if opts.summary_json:
        written = _write_summary(opts, options, spec, counts, outcome, where)
        if not written and outcome.status == EXIT_OK:
            return EXIT_FAILED  # a scheduler that reads the summary would find none
    return outcome.status


def _submit(options, spec, streaming: bool) -> int:
    """On Dataflow: submit and return. A Flex Template launcher must return once the job is
    submitted (waiting would block the launch); the job is followed in the console."""
    from pipeline.options import WalkerosOptions
    from pipeline.summary import EXIT_FAILED, EXIT_OK, Outcome

    opts = options.view_as(WalkerosOptions)
    try:
        with _one_line_failures():
            result = launch(options, spec)
    except Exception as exc:  # the service refused the job: one line, not a traceback
        failure = describe_failure(exc)
        print(f"run failed: {failure}", file=sys.stderr)
        outcome = Outcome(EXIT_FAILED, f"the job was not submitted: {failure}")
        print(outcome.line())
        if opts.summary_json:
            _write_summary(opts, options, spec, {}, outcome, _dead_letter_location(opts))
        return outcome.status
    if _dry_run(options):
        # --dry_run=true: Beam built the whole Dataflow job (what a launch sends) and stopped there.
        outcome = Outcome(
            EXIT_OK,
            f"dry run: the {'streaming' if streaming else 'batch'} job was built for Dataflow and not submitted",
        )
        print(outcome.line())
        return outcome.status
    job_id = getattr(result, "job_id", None)
    job = f" as job {job_id()}" if callable(job_id) else ""
    text = f"{'streaming' if streaming else 'batch'} job submitted{job}; " + (
        "it runs until drained or cancelled" if streaming else "it stops when the input is read"
    )
    outcome = Outcome(EXIT_OK, text)
    print(outcome.line())
    if opts.summary_json:
        _write_summary(opts, options, spec, {}, outcome, _dead_letter_location(opts))
    return outcome.status


def _dead_letter_location(opts) -> str:
    if opts.dead_letter_topic:
        return f"Pub/Sub topic {opts.dead_letter_topic}"
    return f"{opts.dead_letter}*"


def _write_summary(opts, options, spec, counts, outcome, where: str) -> bool:
    from pipeline.summary import summary_document, write_summary_json

    document = summary_document(
        counts,
        outcome,
        command="run",
        run_id=opts.run_id,
        flow=spec.flow_name,
        dead_letters=where,
        options=run_options(options),
    )
    document = _without_key(document, spec.settings.write_key)
    try:
        write_summary_json(opts.summary_json, document)
    except Exception as exc:  # noqa: BLE001 - the summary is lost, the run is not
        print(f"--summary_json {opts.summary_json}: cannot write the summary: {exc}", file=sys.stderr)
        return False
    return True


def _without_key(value, key):
    """Defence in depth: no flag holds the write key, but should a value equal it (a key pasted
    into --run_id, say), the summary file must still not carry it."""
    try:
        secret = key.reveal() if key.resolvable_here() else None
    except Exception:  # noqa: BLE001 - no key here, nothing to hide
        secret = None
    if not secret:
        return value

    from decide.secrets import redact_secret

    def scrub(item):
        if isinstance(item, dict):
            return {k: scrub(v) for k, v in item.items()}
        if isinstance(item, list):
            return [scrub(v) for v in item]
        return redact_secret(item, secret) if isinstance(item, str) else item

    return scrub(value)


def run_options(options) -> dict:
    """The run's options as given (defaults included for ours), for the JSON summary. The write
    key is never a flag (it comes from the flow file's $env/$secret), so none of these holds it."""
    from pipeline.options import WalkerosOptions

    ours = options.view_as(WalkerosOptions).get_all_options(current_only=True)
    given = options.get_all_options(drop_default=True)
    return {**{k: v for k, v in given.items() if v is not None}, **ours}


def describe_failure(exc: BaseException) -> str:
    """The error a pipeline step raised, as one line: its own message and the step.

    Runners re-raise a step's exception with ``[while running 'Step']`` appended (the original
    is the ``__context__``); the innermost one with the same message is the real error."""
    import re

    steps = re.findall(r"\[while running '([^']+)'\]", str(exc))
    inner = exc
    for _ in range(10):
        nxt = inner.__cause__ or inner.__context__
        if nxt is None or not str(nxt) or str(nxt) not in str(inner):
            break
        inner = nxt
    message = str(inner)
    if TRACEBACK in message and inner is exc:
        message = _error_of_traceback_text(message)
    message = re.sub(r"\s*\[while running '[^']+'\]", "", message).strip()
    message = " ".join(message.split())  # one line, whatever the exception held
    if not message or not _is_user_facing(inner):
        message = f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    return f"{message} (in step {steps[-1]!r})" if steps else message


def _error_of_traceback_text(text: str) -> str:
    """A worker process's error (multi_processing) arrives as text only, the worker's traceback
    and all: the error is the unindented line(s) after the last traceback's frames, "pkg.Error:
    message [while running 'Step']" (or, in another layout, the text before the first traceback)."""
    import re

    before, _, last = text.rpartition(TRACEBACK)
    lines = [line for line in last.splitlines()[1:] if line.strip() and not line[:1].isspace()]
    error = " ".join(lines) or before.split(TRACEBACK)[0]
    # The worker names the error's class, wrapped in Beam's ("RuntimeError: pkg.Error: ..."): the
    # message is what the user needs.
    return re.sub(r"^\s*(?:(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): )+", "", error)


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_user_facing(exc: BaseException) -> bool:
    # Most errors speak for themselves; a bare KeyError('x') or TypeError does not without its name.
    return not isinstance(exc, (LookupError, AttributeError, TypeError, NameError, ArithmeticError, AssertionError))


class _DropStepTracebacks:
    """Beam logs a failing step's traceback before re-raising it; the command reports the error
    in one line instead. WALKEROS_SEGMENT_DEBUG=1 keeps Beam's tracebacks."""

    def filter(self, record) -> bool:
        return not (
            record.exc_info or TRACEBACK in str(record.msg) or TRACEBACK in "".join(map(str, record.args or ()))
        )


def _thread_failure_logged(args) -> None:
    logging.getLogger(__name__).debug(
        "thread %s ended: %s: %s", args.thread and args.thread.name, args.exc_type.__name__, args.exc_value
    )


class _one_line_failures:
    def __enter__(self):
        self.filter = _DropStepTracebacks()
        debug = os.environ.get("WALKEROS_SEGMENT_DEBUG")
        self.loggers = (
            []
            if debug
            else [
                logging.getLogger(name)
                for name in (
                    "apache_beam.runners.common",
                    "apache_beam.runners.direct.executor",
                    "apache_beam.runners.worker.sdk_worker",
                    "apache_beam.runners.worker.bundle_processor",
                    "apache_beam.runners.portability.fn_api_runner.fn_runner",
                    # a run on worker processes stopped midway: its channels and handlers end with errors
                    "apache_beam.runners.worker.data_plane",
                    "apache_beam.runners.portability.fn_api_runner.worker_handlers",
                )
            ]
        )
        for logger in self.loggers:
            logger.addFilter(self.filter)
        # The same for the runner's threads (a worker's channel, its process), which would print
        # their tracebacks themselves: what went wrong is said by the run's outcome.
        self.thread_hook = threading.excepthook
        if not debug:
            threading.excepthook = _thread_failure_logged
        from pipeline.local_workers import worker_log_filters

        self.worker_filters = worker_log_filters(keep_tracebacks=bool(debug))
        for logger, log_filter in self.worker_filters:
            logger.addFilter(log_filter)
        return self

    def __exit__(self, *exc):
        threading.excepthook = self.thread_hook
        for logger in self.loggers:
            logger.removeFilter(self.filter)
        for logger, log_filter in self.worker_filters:
            logger.removeFilter(log_filter)
        return False


def _run_local_streaming(result, opts) -> bool:
    """The streaming DirectRunner never finishes by itself: run until Ctrl-C (or SIGTERM), then
    drain. True when it drained (everything read was delivered or dead-lettered), False when it
    was stopped without draining (a second Ctrl-C)."""
    from pipeline import local_streaming

    print(
        "streaming on the local DirectRunner; Ctrl-C stops it (after sending what it holds)",
        file=sys.stderr,
        flush=True,
    )
    # The runner is waited for on another thread: a KeyboardInterrupt inside the DirectRunner's
    # own wait shuts its workers down at once, which is the loss a drain is there to avoid.
    finished = _Waiter(result)
    try:
        try:
            finished.wait()
            return True
        except KeyboardInterrupt:
            pass
        print(
            "draining: no more reading; sending or dead-lettering what is buffered "
            "(Ctrl-C again stops at once and loses it)...",
            file=sys.stderr,
            flush=True,
        )
        local_streaming.drain()
        wake_the_reader(opts.input_subscription, opts.input_topic)
        try:
            finished.wait()
            return True
        except KeyboardInterrupt:
            print("stopping without draining...", file=sys.stderr, flush=True)
            result.cancel()
            return False
    finally:
        local_streaming.start()  # the next pipeline in this process reads again


class _sigterm_as_interrupt:
    """SIGTERM (a scheduler's timeout, ``kill``) stops a local run as Ctrl-C does: a batch run
    reports that it was stopped (exit 1), a streaming run drains. Main thread only (signals)."""

    def __enter__(self):
        import signal

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        self.previous = signal.signal(signal.SIGTERM, interrupt) if _main_thread() else None
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class _Waiter:
    """``result.wait_until_finish()`` on a daemon thread; :meth:`wait` returns when it did
    (re-raising its error) and stays interruptible by signals meanwhile."""

    def __init__(self, result):
        import threading

        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result = result
        threading.Thread(target=self._run, name="wait-until-finish", daemon=True).start()

    def _run(self) -> None:
        try:
            self.result.wait_until_finish()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> None:
        while not self.done.wait(0.2):
            pass
        if self.error is not None:
            raise self.error


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def wake_the_reader(subscription: str | None, topic: str | None) -> None:
    """The DirectRunner's Pub/Sub pull blocks up to 30 s on an idle subscription; a heartbeat
    (dropped by ReadEvents) makes it return at once. Only on the emulator: on a real topic every
    other subscriber would see it."""
    from transforms.read import publish_heartbeat

    if os.environ.get("PUBSUB_EMULATOR_HOST") and (subscription or topic):
        try:
            publish_heartbeat(topic=topic, subscription=subscription, timeout_s=5)
            return
        except Exception as exc:  # noqa: BLE001 - then the drain just takes longer
            print(f"could not publish a heartbeat ({type(exc).__name__}: {exc})", file=sys.stderr)
    print("the drain may take up to 30 s (the DirectRunner finishes its Pub/Sub pull first)", file=sys.stderr)


def _settle_heap() -> None:
    """Move what start-up built (Beam, the compiled flow) out of the garbage collector's sight.

    The per-event path allocates many short-lived dicts; without this, every collection walks
    the whole start-up heap again (measured: about a sixth of the local pipeline's CPU time).
    Collections are also made rarer (:func:`pipeline.local_workers.collect_less_often`).
    """
    from pipeline.local_workers import collect_less_often

    gc.collect()
    gc.freeze()
    collect_less_often()


def _with_default_runner(argv: list[str]) -> list[str]:
    # The default DirectRunner first tries to download Prism, which fails offline and, online,
    # silently changes semantics: name the runner unless the user did.
    if any(a == "--runner" or a.startswith("--runner=") for a in argv):
        return argv
    streaming = any(
        a in ("--streaming", "--input_subscription", "--input_topic")
        or a.startswith(("--input_subscription=", "--input_topic="))
        for a in argv
    )
    return [*argv, "--runner", "BundleBasedDirectRunner" if streaming else "FnApiRunner"]


def _dry_run(options) -> bool:
    from apache_beam.options.pipeline_options import TestOptions

    return bool(options.view_as(TestOptions).dry_run)


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

    from transforms.read import check_pubsub_path

    problems = []
    inputs = [
        f
        for f, v in (
            ("--input", opts.input),
            ("--input_subscription", opts.input_subscription),
            ("--input_topic", opts.input_topic),
        )
        if v
    ]
    if len(inputs) > 1:
        problems.append(f"give one input, not {' and '.join(inputs)}")
    if opts.dead_letter and opts.dead_letter_topic:
        problems.append("give --dead_letter or --dead_letter_topic, not both")
    for flag, kind, value in (
        ("--input_subscription", "subscription", opts.input_subscription),
        ("--input_topic", "topic", opts.input_topic),
        ("--dead_letter_topic", "topic", opts.dead_letter_topic),
    ):
        problem = value and check_pubsub_path(kind, value)
        if problem:
            problems.append(f"{flag}: {problem}")
    pubsub = bool(opts.input_subscription or opts.input_topic)
    if not pubsub and (opts.id_label or opts.timestamp_attribute):
        problems.append(
            "--id_label and --timestamp_attribute apply to Pub/Sub input only (--input_subscription / --input_topic)"
        )
    runner = str(options.view_as(StandardOptions).runner or "")
    if _is_direct(options):
        if pubsub and opts.id_label:
            problems.append(
                "--id_label is supported on Dataflow only: the local DirectRunner cannot deduplicate on a "
                "Pub/Sub attribute (Beam's reader raises NotImplementedError once the pipeline runs). "
                "Drop --id_label to run locally, or run on Dataflow (--runner DataflowRunner)."
            )
        if opts.fail_bundle_on_delivery_error:
            # A local runner does not retry a failed bundle (the FnApiRunner fails the
            # run; the DirectRunner retries 4 times at once, then fails it): one exhausted batch
            # would throw away the whole run. Dead letters are the local way: they replay.
            problems.append(
                "--fail_bundle_on_delivery_error needs a runner that retries failed bundles "
                "(Dataflow); on the local runners one batch that runs out of retries would fail "
                "the whole run. Leave it off: such events are dead-lettered (delivery_failed) "
                "and replay with --input_format dead_letter"
            )
        if pubsub and "FnApiRunner" in runner:
            problems.append(
                "--runner FnApiRunner cannot read Pub/Sub (the pipeline hangs without an error): "
                "use --runner BundleBasedDirectRunner (the default for Pub/Sub input), or Dataflow"
            )
    else:
        # Workers only see Cloud Storage, not the disk of the machine that launched the job.
        for flag, value in (("--input", opts.input), ("--dead_letter", opts.dead_letter)):
            if value and not value.startswith("gs://"):
                problems.append(
                    f"{flag} {value}: on {runner or 'this runner'} files must be on gs:// "
                    "(the workers cannot read this machine's disk)"
                )
    return problems


def local_segment(argv: list[str]) -> int:
    from local_segment import main as local_main

    return local_main(argv)


def demo(argv: list[str]) -> int:
    """The bundled example, end to end, with no credentials and no network."""
    from pipeline.demo import main as demo_main

    return demo_main(argv, run)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
