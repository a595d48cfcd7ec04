"""Move: the Beam layer. One small DoFn or composite per graph step, counters inside."""

# The tagged output that carries dead letters out of every step that makes them.
DEAD_LETTER_TAG = "dead_letter"

# The counters' namespace, and the counter of input files not read to their end (transforms.files;
# a run with any has failed). Here, not in transforms.metrics, so the summary reads them without Beam.
NAMESPACE = "walkeros_segment"
DAMAGED_FILES_COUNTER = "input_files_damaged"
