"""WriteDeadLetters: one record per failed input, to JSON Lines or Avro files, or a Pub/Sub topic.

Reading them back is ``--input_format dead_letter`` (``pipeline.sources``): the original
payload goes through the same transforms again.
"""
from __future__ import annotations

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.transforms import window

import schemas
from transforms.dead_letter import DeadLetter

STREAMING_FILE_WINDOW_S = 60


class WriteDeadLetters(beam.PTransform):
    def __init__(self, prefix: str | None = None, fmt: str = "jsonl", topic: str | None = None,
                 streaming: bool = False):
        super().__init__()
        if not prefix and not topic:
            raise ValueError("dead letters need a place: --dead_letter PREFIX or --dead_letter_topic TOPIC")
        self.prefix = prefix
        self.fmt = fmt
        self.topic = topic
        self.streaming = streaming

    def expand(self, dead_letters):
        if self.topic:
            return (dead_letters
                    | "ToBytes" >> beam.Map(lambda d: orjson.dumps(d.to_dict())).with_output_types(bytes)
                    | "Publish" >> beam.io.WriteToPubSub(self.topic))
        if self.streaming:
            # Unbounded input: close a file every window so records become visible.
            return (dead_letters
                    | "Window" >> beam.WindowInto(window.FixedWindows(STREAMING_FILE_WINDOW_S))
                    | "ToJson" >> beam.Map(DeadLetter.to_json)
                    | "WriteFiles" >> fileio.WriteToFiles(
                        path=self.prefix.rstrip("/"),
                        file_naming=fileio.default_file_naming("dead-letters", ".jsonl"),
                        shards=1))
        if self.fmt == "avro":
            return (dead_letters
                    | "ToRecord" >> beam.Map(DeadLetter.to_dict)
                    | "WriteAvro" >> beam.io.WriteToAvro(self.prefix, schemas.load("dead_letter.avsc"),
                                                         file_name_suffix=".avro"))
        return (dead_letters
                | "ToJson" >> beam.Map(DeadLetter.to_json)
                | "WriteJsonl" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl"))
