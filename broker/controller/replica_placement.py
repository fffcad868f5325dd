"""Where the replicas of new partitions go: spread evenly, rack-aware, preferred leader first.

Theory of operation
-------------------
Placement is greedy on load, one partition at a time, counting what is already placed (the
existing partitions of every topic, then the new partitions as they are placed):

1. The preferred leader (first replica) is one of the brokers that are preferred leader of
   the fewest partitions. Because it always is, preferred leaders per broker never differ by
   more than one (over a fixed set of brokers), whatever the replication factors.
2. Each further replica is taken from the brokers not yet chosen for this partition: first
   those on a rack the partition does not use yet (so a partition spans as many racks as it
   can), then those with the fewest replicas, then those that lead the most (they get
   fewer replicas as followers, which keeps both counts level), then the lowest id.
3. Which of the least-leading brokers leads is decided by trying each kind of them (one per
   replica count and rack; the others are interchangeable) with its followers: the one that
   leaves replica counts most even wins, and among equals the one with the most replicas,
   which keeps the brokers with fewer replicas free to lead a later partition without
   adding to the busiest.

Without racks this has kept both leaders and replicas per broker within one of each other
after every partition, for one or mixed replication factors, in every property test and
simulation we ran (it is not proven in general). Once brokers come and go, or with uneven
racks, no online placement can promise that; this one stays close. With racks, rack
diversity comes before balance, as in Kafka. A broker without a rack counts as one unnamed
rack. Pure: the same inputs give the same placement on every node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementBroker:
    """A broker that may receive new replicas (registered, not fenced, not shut down)."""

    broker_id: int
    rack: str | None = None


def place_replicas(
    brokers: Sequence[PlacementBroker],
    existing_replicas: Iterable[Sequence[int]] = (),
    *,
    partition_count: int,
    replication_factor: int,
    replica_counts: Mapping[int, int] | None = None,
    leader_counts: Mapping[int, int] | None = None,
) -> list[tuple[int, ...]]:
    """Return the replica lists of `partition_count` new partitions, preferred leader first.

    The load already placed is `existing_replicas` (the replica lists of every partition)
    plus, if given, `replica_counts` and `leader_counts` (replicas and preferred leaderships
    per broker id, as `MetadataImage` keeps them, so a caller need not walk every
    partition); ids of brokers not in `brokers` are ignored. Needs 1 <= replication_factor
    <= len(brokers) and distinct broker ids (asserted: the caller validates requests).
    """
    assert 1 <= replication_factor <= len(brokers), "the caller checks the replication factor"
    assert len({broker.broker_id for broker in brokers}) == len(brokers)
    racks = {broker.broker_id: broker.rack for broker in brokers}
    replica_count = {b: (replica_counts or {}).get(b, 0) for b in racks}
    leader_count = {b: (leader_counts or {}).get(b, 0) for b in racks}
    for replicas in existing_replicas:
        if replicas and replicas[0] in leader_count:
            leader_count[replicas[0]] += 1
        for broker_id in replicas:
            if broker_id in replica_count:
                replica_count[broker_id] += 1
    placed = []
    for _ in range(partition_count):
        fewest_led = min(leader_count.values())
        kinds: dict[tuple[int, str | None], int] = {}
        for broker_id in sorted(racks):
            if leader_count[broker_id] == fewest_led:
                kinds.setdefault((replica_count[broker_id], racks[broker_id]), broker_id)
        chosen = min(
            (
                _with_followers(leader, replication_factor, racks, replica_count, leader_count)
                for leader in kinds.values()
            ),
            key=lambda replicas: (
                _replica_spread_after(replicas, replica_count),
                -replica_count[replicas[0]],
                replicas[0],
            ),
        )
        leader_count[chosen[0]] += 1
        for broker_id in chosen:
            replica_count[broker_id] += 1
        placed.append(chosen)
    return placed


def _with_followers(
    leader: int,
    replication_factor: int,
    racks: dict[int, str | None],
    replica_count: dict[int, int],
    leader_count: dict[int, int],
) -> tuple[int, ...]:
    chosen = [leader]
    used_racks = {racks[leader]}
    while len(chosen) < replication_factor:
        follower = min(
            (broker_id for broker_id in racks if broker_id not in chosen),
            key=lambda broker_id: (
                racks[broker_id] in used_racks,
                replica_count[broker_id],
                -leader_count[broker_id],
                broker_id,
            ),
        )
        chosen.append(follower)
        used_racks.add(racks[follower])
    return tuple(chosen)


def _replica_spread_after(replicas: tuple[int, ...], replica_count: dict[int, int]) -> int:
    """Most minus fewest replicas per broker once `replicas` are placed."""
    added = set(replicas)
    counts = [count + (broker_id in added) for broker_id, count in replica_count.items()]
    return max(counts) - min(counts)


def choose_replacement(
    brokers: Sequence[PlacementBroker],
    replicas: Sequence[int],
    leaving: int,
    *,
    excluded: Iterable[int] = (),
    replica_counts: Mapping[int, int] | None = None,
    leader_counts: Mapping[int, int] | None = None,
) -> int | None:
    """Return the broker to take the place of `leaving` in a partition's `replicas` (moving
    a replica off a broker), or None when no broker of `brokers` can.

    The candidates are `brokers` that are neither in `replicas` nor `excluded`. As for a new
    partition: first those on a rack the other replicas do not use, then, for a follower's
    place, the fewest replicas, the most preferred leaderships, the lowest id; for the
    preferred leader's place (the first), the fewest preferred leaderships first. Counts
    per broker id as in `place_replicas` (missing: 0). Pure.
    """
    assert leaving in replicas, (leaving, replicas)
    taken = set(replicas) | set(excluded)
    candidates = [broker for broker in brokers if broker.broker_id not in taken]
    if not candidates:
        return None
    racks = {broker.broker_id: broker.rack for broker in brokers}
    used_racks = {racks.get(r) for r in replicas if r != leaving and r in racks}
    replica_count = replica_counts or {}
    leader_count = leader_counts or {}
    leads = replicas[0] == leaving

    def key(broker: PlacementBroker) -> tuple[bool, int, int, int]:
        replicas_held = replica_count.get(broker.broker_id, 0)
        led = leader_count.get(broker.broker_id, 0)
        load = (led, replicas_held) if leads else (replicas_held, -led)
        return (broker.rack in used_racks, *load, broker.broker_id)

    return min(candidates, key=key).broker_id
