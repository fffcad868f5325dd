"""The nemesis checker: a pure function from what clients saw to a verdict.

Theory of operation. During a nemesis run the clients record a `History`: every acks=all
write acknowledged (partition, offset, value) with the time of its acknowledgement, the
values whose outcome is unknown, every record a consumer was given, and series of offsets
that must never go back (a consumer's positions while it owns a partition, the group's
committed offsets as read over time). At the end the logs are read in full (`final`). The
checker compares them:

- lost: an acknowledged record that is not at its acknowledged (partition, offset) at the
  end (gone, or moved to another offset);
- reused: a (partition, offset) where two different values were ever seen (acknowledged,
  consumed or in the final log);
- phantom: a record a consumer was given that is not at its (partition, offset) at the end;
- regressions: an offset series that went back;
- max_unavailable_s: the longest time with no acknowledged write (from the start of the
  workload to its end);
- dup: values stored more than once: found at more than one (partition, offset) among the
  acknowledged, consumed and final records (a consumer's reads count, so a copy retention
  deleted before the end is seen too). A failure when the writers were idempotent producers
  (`History.exactly_once`): a retried batch must then be stored once. Without idempotence a
  resend of an unknown outcome may store it twice, and dup is only reported.

Values are unique per send (``w<writer>-<n>``), so a value names one write.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class Acknowledged:
    partition: int
    offset: int
    value: bytes
    at_s: float  # when the acknowledgement arrived


@dataclass(frozen=True, slots=True, kw_only=True)
class Consumed:
    reader: str
    partition: int
    offset: int
    value: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetSample:
    """One point of a series that must not go back: `series` names it (a consumer's
    ownership of a partition, or the group's committed offset of a partition)."""

    series: str
    partition: int
    offset: int
    at_s: float


@dataclass(slots=True, kw_only=True)
class History:
    started_s: float = 0.0
    ended_s: float = 0.0
    acknowledged: list[Acknowledged] = field(default_factory=list)
    unknown: list[bytes] = field(default_factory=list)  # outcome unknown: may be stored
    failed: list[bytes] = field(default_factory=list)  # refused: not stored
    consumed: list[Consumed] = field(default_factory=list)
    offsets: list[OffsetSample] = field(default_factory=list)  # in the order recorded
    exactly_once: bool = False  # the writers were idempotent: a duplicate is a failure


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    acknowledged: int
    unknown: int
    lost: tuple[str, ...]
    reused: tuple[str, ...]
    phantom: tuple[str, ...]
    regressions: tuple[str, ...]
    duplicates: int
    max_unavailable_s: float
    exactly_once: bool = False

    @property
    def ok(self) -> bool:
        if self.exactly_once and self.duplicates:
            return False
        return not (self.lost or self.reused or self.phantom or self.regressions)

    def line(self, seed: int) -> str:
        return (
            f"nemesis seed={seed} acked={self.acknowledged} unknown={self.unknown} "
            f"lost={len(self.lost)} reused={len(self.reused)} phantom={len(self.phantom)} "
            f"regressions={len(self.regressions)} "
            f"max_unavailable_s={self.max_unavailable_s:.1f} dup={self.duplicates}"
        )

    def details(self, limit: int = 20) -> str:
        """The first `limit` findings of each kind, one per line."""
        lines = []
        for name in ("lost", "reused", "phantom", "regressions"):
            for finding in getattr(self, name)[:limit]:
                lines.append(f"{name}: {finding}")
        if self.exactly_once and self.duplicates:
            lines.append(f"dup: {self.duplicates} values stored twice by idempotent writers")
        return "\n".join(lines)


# The final logs: partition -> offset -> value.
FinalLogs = dict[int, dict[int, bytes]]


def check(history: History, final: FinalLogs) -> Verdict:
    """The verdict on `history` given the logs read in full at the end."""
    return Verdict(
        acknowledged=len(history.acknowledged),
        unknown=len(history.unknown),
        lost=_lost(history, final),
        reused=_reused(history, final),
        phantom=_phantom(history, final),
        regressions=_regressions(history),
        duplicates=_duplicates(history, final),
        max_unavailable_s=_max_unavailable_s(history),
        exactly_once=history.exactly_once,
    )


def _lost(history: History, final: FinalLogs) -> tuple[str, ...]:
    found = []
    for ack in history.acknowledged:
        stored = final.get(ack.partition, {}).get(ack.offset)
        if stored != ack.value:
            found.append(
                f"{ack.value!r} acknowledged at {ack.partition}/{ack.offset} "
                f"(t={ack.at_s:.2f}), at the end there is {stored!r}"
            )
    return tuple(found)


def _reused(history: History, final: FinalLogs) -> tuple[str, ...]:
    seen: dict[tuple[int, int], set[bytes]] = collections.defaultdict(set)
    for ack in history.acknowledged:
        seen[ack.partition, ack.offset].add(ack.value)
    for record in history.consumed:
        seen[record.partition, record.offset].add(record.value)
    for partition, records in final.items():
        for offset, value in records.items():
            seen[partition, offset].add(value)
    return tuple(
        f"{partition}/{offset}: {sorted(values)!r}"
        for (partition, offset), values in sorted(seen.items())
        if len(values) > 1
    )


def _phantom(history: History, final: FinalLogs) -> tuple[str, ...]:
    found = []
    reported: set[tuple[int, int, bytes]] = set()
    for record in history.consumed:
        key = (record.partition, record.offset, record.value)
        stored = final.get(record.partition, {}).get(record.offset)
        if stored != record.value and key not in reported:
            reported.add(key)
            found.append(
                f"{record.reader} read {record.value!r} at {record.partition}/{record.offset}, "
                f"at the end there is {stored!r}"
            )
    return tuple(found)


def _regressions(history: History) -> tuple[str, ...]:
    found = []
    last: dict[tuple[str, int], OffsetSample] = {}
    for sample in history.offsets:
        key = (sample.series, sample.partition)
        before = last.get(key)
        if before is not None and sample.offset < before.offset:
            found.append(
                f"{sample.series} partition {sample.partition}: {before.offset} "
                f"(t={before.at_s:.2f}) then {sample.offset} (t={sample.at_s:.2f})"
            )
        last[key] = sample
    return tuple(found)


def _duplicates(history: History, final: FinalLogs) -> int:
    """How many more (partition, offset) places than one each value was seen at."""
    places: dict[bytes, set[tuple[int, int]]] = collections.defaultdict(set)
    for ack in history.acknowledged:
        places[ack.value].add((ack.partition, ack.offset))
    for record in history.consumed:
        places[record.value].add((record.partition, record.offset))
    for partition, records in final.items():
        for offset, value in records.items():
            places[value].add((partition, offset))
    return sum(len(found) - 1 for found in places.values())


def _max_unavailable_s(history: History) -> float:
    times = sorted(ack.at_s for ack in history.acknowledged)
    edges = [history.started_s, *times, max(history.ended_s, history.started_s)]
    return max(b - a for a, b in zip(edges, edges[1:]))
