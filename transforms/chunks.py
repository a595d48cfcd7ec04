"""Payloads in chunks: how a batch run hands its input from one step to the next.

Beam's Python SDK costs a few microseconds for every element at every step (its reader claims
and timestamps each record, each step's output goes through its receivers and counters). A
batch run therefore moves lists of payloads, about :data:`CHUNK` at a time, and each step
loops over a list in plain Python. Streaming runs stay one message per element: there an
element is what arrives, and latency matters more than the cost per element.

* :class:`LineChunkSource`: plain JSON Lines files, split into byte ranges as Beam's text
  reader splits them (a line belongs to the range its first byte is in), read as lists of
  payloads;
* :class:`GatherChunks`: any other payloads (whole files, Avro records, a test's ``Create``)
  gathered into lists within a bundle.
"""

from __future__ import annotations

import pickle

import apache_beam as beam
from apache_beam.io.filebasedsource import FileBasedSource
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.transforms.window import GlobalWindows

from transforms.files import line_payload

# Payloads in a chunk: enough that Beam's cost per element is small beside a chunk's work
# (~500 events of ~0.5 KB), small enough that a chunk's planned events stay a few hundred KB.
CHUNK = 500
# Bytes read from a file at a time.
_BLOCK = 1 << 20


class Chunk(list):
    """A list of payloads, planned events or deliveries that moves as one element (its type
    hint, for :class:`ChunkCoder`)."""


class ChunkCoder(beam.coders.Coder):
    """Pickles, as Beam's PickleCoder, and estimates a chunk's size cheaply. Beam estimates the
    size of a sample of every step's outputs (for Dataflow's monitoring), by default by encoding
    them: a chunk would be pickled whole, each of its events in turn, for nothing but that
    estimate (7% of a batch run's time, measured). A step's other outputs (its dead letters)
    share its coder, so anything else is pickled and measured as it is."""

    def encode(self, value) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes):
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, value) -> int:
        if not isinstance(value, list):
            return len(self.encode(value))
        if not value:
            return 8
        first = value[0]
        if isinstance(first, (bytes, str)):
            return sum(len(item) if isinstance(item, (bytes, str)) else 64 for item in value)
        return len(self.encode(first)) * len(value)  # one item measured, not all

    def to_type_hint(self):
        return Chunk


beam.coders.registry.register_coder(Chunk, ChunkCoder)


class LineChunkSource(FileBasedSource):
    """Uncompressed JSON Lines files as lists of payloads (:func:`line_payload`: blank lines
    left out, line endings ``\\n`` and ``\\r\\n``). Splittable by byte range, as Beam's text
    reader: every line is claimed at its first byte, so a runner may split a range while it is
    read (Dataflow's work rebalancing) and no line is read twice or lost."""

    def __init__(self, file_pattern: str, chunk: int = CHUNK):
        super().__init__(file_pattern, compression_type=CompressionTypes.UNCOMPRESSED, splittable=True)
        self.chunk = chunk

    def default_output_coder(self):
        return ChunkCoder()

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position()
        with self.open_file(file_name) as f:
            if start > 0:
                # The line the range starts inside belongs to the range before: skip past the
                # newline that ends it (looking from one byte earlier, in case it ends right there).
                f.seek(start - 1)
                position, pending = _after_first_newline(f, start - 1)
                if position is None:
                    return
            else:
                position, pending = 0, b""
            claim = range_tracker.try_claim
            chunk = Chunk()
            parts = [pending]  # the start of a line that a later block ends
            while True:
                block = f.read(_BLOCK)
                if block and b"\n" not in block:
                    parts.append(block)  # a long line: joined once it ends, not block by block
                    continue
                parts.append(block)
                lines = b"".join(parts).split(b"\n")
                if block:
                    parts = [lines.pop()]
                elif not lines[-1]:
                    lines.pop()  # the file ends with a newline: nothing follows it
                for line in lines:
                    if not claim(position):
                        if chunk:
                            yield chunk
                        return
                    position += len(line) + 1
                    payload = line_payload(line)
                    if payload is not None:
                        chunk.append(payload)
                        if len(chunk) >= self.chunk:
                            yield chunk
                            chunk = Chunk()
                if not block:
                    break
            if chunk:
                yield chunk


def _after_first_newline(f, position: int) -> tuple[int | None, bytes]:
    """Reads ``f`` (at ``position``) past its next newline: the position after it and what was
    read beyond it, or None when the file ends first."""
    while True:
        block = f.read(_BLOCK)
        if not block:
            return None, b""
        at = block.find(b"\n")
        if at >= 0:
            return position + at + 1, block[at + 1 :]
        position += len(block)


class GatherChunks(beam.DoFn):
    """Payloads → lists of up to ``chunk`` payloads, gathered within a bundle (the last, partial
    list leaves in ``finish_bundle``). For a batch run only: its outputs are in the global window."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk

    def start_bundle(self):
        self.gathered = Chunk()

    def process(self, payload):
        self.gathered.append(payload)
        if len(self.gathered) >= self.chunk:
            yield self.gathered
            self.gathered = Chunk()

    def finish_bundle(self):
        if self.gathered:
            yield GlobalWindows.windowed_value(self.gathered)
            self.gathered = Chunk()
