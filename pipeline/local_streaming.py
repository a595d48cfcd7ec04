"""Running a streaming pipeline on the local DirectRunner until the user stops it, then
draining it: what Dataflow's drain does, which the DirectRunner lacks.

Two things the DirectRunner (Beam 2.77) does not do, added here for local runs only:

* **Drain.** Its Pub/Sub reader acknowledges messages when it pulls them, before they are
  processed, and calls in Beam state wait for ``flushInterval``; cancelling the pipeline loses
  both. Draining instead stops the reader (it reports its watermark as final), so the
  end-of-window timers flush every batch held in state and the pipeline finishes by itself.
  The pull in flight, if any, completes and its messages are processed as usual.
* **Counters.** Each executor thread's state sampler caches a step's metrics scope from the
  step's first bundle, so every later bundle's counts go to a container that was already
  committed: the counters stop at each step's first bundle. Each bundle gets a sampler of its
  own instead, and with it its own container.

Both patch private classes of Beam's DirectRunner; :func:`install` checks they are still there
and refuses (an error, not a silent loss) when a Beam upgrade moved them.
"""

from __future__ import annotations

import threading

_draining = threading.Event()
_installed = False


class UnsupportedBeamVersion(RuntimeError):
    pass


def install() -> None:
    """Patch the DirectRunner once per process (idempotent)."""
    global _installed
    if _installed:
        return
    from apache_beam.runners.direct import executor, transform_evaluator
    from apache_beam.runners.worker import statesampler
    from apache_beam.utils import counters
    from apache_beam.utils.timestamp import MAX_TIMESTAMP

    reader = getattr(transform_evaluator, "_PubSubReadEvaluator", None)
    result_type = getattr(transform_evaluator, "TransformResult", None)
    transform_executor = getattr(executor, "TransformExecutor", None)
    if reader is None or result_type is None or transform_executor is None:
        raise UnsupportedBeamVersion(
            "this Beam version's DirectRunner has no _PubSubReadEvaluator / "
            "TransformExecutor: local streaming cannot drain"
        )
    read_bundle = reader.finish_bundle
    run_bundle = transform_executor.call

    def finish_bundle(self):
        if _draining.is_set():
            # No more pulls, nothing left to read, and a final watermark: the runner fires the
            # end-of-window timers and finishes the pipeline.
            return result_type(self, [], [], None, {None: MAX_TIMESTAMP})
        return read_bundle(self)

    def call(self, state_sampler):
        # A sampler of its own per bundle (then dropped: the thread's sampler would also keep
        # every scope it ever made), so the bundle's counters go to the bundle's container.
        fresh = statesampler.StateSampler("", counters.CounterFactory())
        statesampler.set_current_tracker(fresh)
        try:
            return run_bundle(self, fresh)
        finally:
            statesampler.set_current_tracker(state_sampler)

    reader.finish_bundle = finish_bundle
    transform_executor.call = call
    _installed = True


def start() -> None:
    """A new run reads until :func:`drain` is called."""
    _draining.clear()


def drain() -> None:
    _draining.set()
