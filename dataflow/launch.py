"""The Flex Template's entry point (``FLEX_TEMPLATE_PYTHON_PY_FILE``).

Dataflow's launcher runs this file with the template's parameters as ``--name=value`` flags
(plus the job's own: project, region, staging and temp locations, ...). It is
``walkeros-segment run`` with those flags, on the DataflowRunner unless a runner is named; the
run submits the job and returns without waiting, as a Flex Template launcher must.

The launcher has no secrets: a ``$env.NAME``/``$secret.NAME`` write key, or
``write_key_secret``, is kept as a reference and resolved by the workers only.

The recommended launch sets ``sdk_container_image`` to this template's own image, which already
holds the package. Without it the workers run Beam's stock image, so this file stages the
package with ``--setup_file`` instead (what ``FLEX_TEMPLATE_PYTHON_SETUP_FILE`` would do, but
only when it is needed).
"""

import logging
import os
import sys

from pipeline.cli import main as cli_main

SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(argv: list[str]) -> int:
    if not _given(argv, "--runner"):
        argv = [*argv, "--runner=DataflowRunner"]
    if (
        not _given(argv, "--sdk_container_image")
        and not _given(argv, "--setup_file")
        and os.path.exists(SETUP_FILE)
        and any("Dataflow" in a for a in argv if a.startswith("--runner"))
    ):
        logging.warning(
            "sdk_container_image is not set: the workers will install this package from %s "
            "at start; set it to the template's image to skip that",
            SETUP_FILE,
        )
        argv = [*argv, f"--setup_file={SETUP_FILE}"]
    return cli_main(["run", *argv])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
