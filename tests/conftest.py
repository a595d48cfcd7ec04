"""Shared fixtures: a real local Segment endpoint on loopback."""
import os

import pytest

from pipeline.local_segment import LocalSegment
from support import WRITE_KEY

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def endpoint():
    with LocalSegment(WRITE_KEY) as server:
        yield server
