"""``make run``: the bundled example events through the real pipeline (Beam, DirectRunner, the
real Segment SDK) into a local Segment-compatible endpoint. No credentials, no network.

The same pipeline sends to Segment for real with the user's own flow, input and write key:
``walkeros-segment run --flow FLOW --input PATH --dead_letter PREFIX``.
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import sysconfig
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from local_segment import LocalSegment


def _examples() -> Path:
    """examples/ of a checkout, else where the wheel installed them (setup.py's data_files)."""
    checkout = Path(__file__).resolve().parent.parent / "examples"
    if (checkout / "flow.json").exists():
        return checkout
    return Path(sysconfig.get_path("data")) / "share" / "walkeros-segment" / "examples"


EXAMPLES = _examples()


def main(argv: list[str] | None, run: Callable[[list[str]], int]) -> int:
    """``run``: the command line's ``run`` command (handed in: the demo is one of its commands)."""
    parser = argparse.ArgumentParser(prog="walkeros-segment demo", description=__doc__.splitlines()[0])
    parser.add_argument("--flow", default=str(EXAMPLES / "flow.json"))
    parser.add_argument("--input", default=str(EXAMPLES / "events.jsonl"))
    parser.add_argument("--out", default="out/demo", help="folder for what the endpoint received and the dead letters")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    received = out / "segment-received.jsonl"
    received.unlink(missing_ok=True)
    for old in glob.glob(str(out / "dead-letters*")):
        os.remove(old)

    # A throwaway key for the local endpoint; it is never printed or written anywhere.
    write_key = "demo-" + secrets.token_hex(8)
    with LocalSegment(write_key, record_path=str(received)) as endpoint:
        os.environ["SEGMENT_WRITE_KEY"] = write_key
        os.environ["SEGMENT_HOST"] = endpoint.url
        print(f"local Segment endpoint: {endpoint.url}")
        print(f"flow: {args.flow}\ninput: {args.input}\n")
        code = run(["--flow", args.flow, "--input", args.input, "--dead_letter", str(out / "dead-letters")])
        if code not in (0, 3):  # 3: dead letters, which the example's bad lines are there to show
            return code
        by_type = Counter(m.get("type") for m in endpoint.accepted)
        print(
            f"\nthe endpoint accepted {len(endpoint.accepted)} messages in {len(endpoint.requests)} request(s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_type.items()))
        )
    dead_files = sorted(glob.glob(str(out / "dead-letters*")))
    print(f"received messages: {received}")
    print(f"dead letters:      {', '.join(dead_files) or 'none'}")
    return 0
