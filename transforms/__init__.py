"""Move: the Beam layer. One small DoFn or composite per graph step, counters inside."""

# The tagged output that carries dead letters out of every step that makes them.
DEAD_LETTER_TAG = "dead_letter"
