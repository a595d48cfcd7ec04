"""The Flex Template's entry point (``FLEX_TEMPLATE_PYTHON_PY_FILE``).

Dataflow's launcher runs this file with the template's parameters as ``--name=value`` flags
(plus the job's own: project, region, staging and temp locations, ...). It is
``walkeros-segment run`` with those flags, on the DataflowRunner unless a runner is named; the
run submits the job and returns without waiting, as a Flex Template launcher must.
"""
import logging
import sys

from pipeline.cli import main as cli_main


def main(argv: list[str]) -> int:
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        argv = [*argv, "--runner=DataflowRunner"]
    return cli_main(["run", *argv])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
