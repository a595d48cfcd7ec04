"""``python -m local_segment``: the local Segment-compatible endpoint from the command line."""

import sys

from local_segment.serve import main

sys.exit(main())
