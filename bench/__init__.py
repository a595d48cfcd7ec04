"""The benchmark: ``python -m bench`` (``make bench``). Not a test."""
