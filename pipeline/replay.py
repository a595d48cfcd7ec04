"""Before a replay (``--input_format dead_letter``) starts: the dead letters must be replayed by
the flow that wrote them and under its messageId namespace. Another flow would map them by its
own rules, and another namespace gives other messageIds, so Segment would store again what it
already has instead of deduplicating it."""

from __future__ import annotations

from apache_beam.io.filesystems import FileSystems


def replay_problem(pattern: str, flow_name: str, namespace: str) -> str | None:
    """One line saying why the dead letters of ``pattern`` cannot be replayed by this flow and
    namespace, and how to replay them; None when they can (or nothing matches: said elsewhere)."""
    from transforms.files import dead_letter_records

    origins: set[tuple[str, str | None]] = set()
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        for record in dead_letter_records(metadata.path, metadata.size_in_bytes):
            flow = record.get("flow") or flow_name  # a record without one: nothing to compare
            origins.add((flow, record.get("namespace")))
    foreign = sorted((flow, ns) for flow, ns in origins if flow != flow_name or (ns is not None and ns != namespace))
    if not foreign:
        return None
    flow, ns = foreign[0]
    theirs = f"flow {flow!r}" + (f" (messageId namespace {ns!r})" if ns is not None else "")
    how = " ".join(
        ([f"--flow_name {flow}"] if flow != flow_name else [])
        + ([f"--message_id_namespace {ns}"] if ns is not None and ns != namespace else [])
    )
    more = (
        (
            f"; they also hold dead letters of {len(foreign) - 1} other flow/namespace pair(s): "
            "replay each with its own run"
        )
        if len(foreign) > 1
        else ""
    )
    return (
        f"{pattern}: dead letters of {theirs} cannot be replayed by flow {flow_name!r} (messageId namespace "
        f"{namespace!r}): the mapping or the messageIds would differ, and Segment could not deduplicate "
        f"what it already has. Replay them with {how}{more}"
    )
