"""The benchmark of issue 7: ``python -m bench`` (``make bench``). Not a test."""
