"""The leader's view of one partition's replicas: each follower's log end offset and last
caught-up time, the ISR (committed and maximal), and the high watermark. Sans-I/O: no trio,
no files, no clock; time arrives as `now_ms` arguments, and every method is synchronous,
so the state changes only between awaits of the shell that drives it.

Theory of operation
-------------------
A broker builds one `PartitionReplicas` when the metadata image makes it the partition's
leader (a new leader epoch means a new object). From then on:

- The shell reports the leader's own progress (`leader_progress`): its log end offset
  (LEO) and its *acknowledged* offset, the offset below which the leader counts its own
  copy - its durable offset under fsync=always, its LEO otherwise.
- Each follower fetch reports the follower's LEO (`follower_fetched`): the fetch offset
  is the first offset the follower lacks, so everything below it is on the follower.
- The high watermark (HW) is the minimum, over the *maximal* ISR, of each member's
  acknowledged offset, and it never moves back (the state keeps the maximum). A follower
  whose LEO is still unknown (-1, no fetch yet in this leader epoch) holds the HW where it
  is, as a new Kafka leader's HW waits for its followers.
- The committed ISR is the one in the metadata image. An ISR change is proposed to the
  controller as an AlterPartition request (a compare-and-swap on the partition epoch),
  one change in flight per partition. While a change is in flight the maximal ISR is the
  committed ISR plus the members a pending expansion adds; a pending shrink removes no one
  from it until committed. So the HW waits for every replica that is, or may be about to
  become, in sync: if the controller refuses a shrink, the replicas it would have removed
  are still in the ISR, and the HW never got ahead of them; if it accepts an expansion, the
  new member already had everything below the HW. (Kafka's Partition.scala, KIP-497.)
- `isr_change_wanted(now_ms)` proposes a change (shrink first, expansion otherwise); the
  shell sends it, calls `isr_change_sent`, and later `isr_change_committed` (the image shows
  a newer partition epoch: ours or anyone's change) or `isr_change_failed` (refused, timed
  out, or unsent: the next `isr_change_wanted` may propose again).
- A reassignment changes the replica set within a leader epoch (`isr_change_committed` with
  `replicas`): a new replica becomes a follower outside the ISR, with an unknown log end
  until it fetches, and joins the ISR by the expansion rule below like any other; a replica
  that left is forgotten. The HW never waits for a replica outside the ISR, so neither
  moves it back.

Every method that can move the HW returns the new HW when it moved, else None; the shell
then tells the partition log its HW and wakes the acks=all writes it lets through
(`acks_all_result`).

The caught-up rule (Kafka's, ReplicaState.updateFetchState)
-----------------------------------------------------------
On a fetch at time t with fetch offset f, where the leader's LEO is L(t) now and was
L(p) at the follower's previous fetch, at time p:

- f >= L(t): the follower has everything the leader has; it is caught up at t.
- else f >= L(p): it has everything the leader had when it last asked; it is caught up
  at p (not at t: writes that arrived since p are not on it yet).
- else: its last caught-up time stays where it was.

The last caught-up time only moves forward. The second clause is why a follower under a
steady stream of writes stays in sync: between two fetches new batches always arrive, so
its fetch offset rarely equals the leader's current LEO, yet each fetch brings it up to
where the leader was one round trip ago. Its lag is then bounded by its fetch interval: a
follower fetching at least every `replica_lag_time_max_ms / 2` is never shrunk.

A follower lags - and a shrink removes it - when its fetch offset is below the leader's
LEO and its last caught-up time is more than `replica_lag_time_max_ms` before now (Kafka's
`isCaughtUp`: a follower holding everything the leader has is not lagging, however long
ago it fetched; on an idle partition the leader does not churn the ISR). The leader is
never removed. A non-ISR follower is added when its fetch offset is at least the HW and
at least the start offset of the current leader epoch (its log agrees with this leader's:
it has fetched within this epoch), and it does not lag by the rule above (otherwise it
would be removed again at the next check).

acks=all
--------
`check_append` refuses an acks=all write with NOT_ENOUGH_REPLICAS while the committed ISR
is smaller than min.insync.replicas. A write that was admitted waits until the HW reaches
its end offset; at that point, if the maximal ISR - the set whose every member holds the
write, since the HW is a minimum over it - is smaller than min.insync.replicas, the write
is answered NOT_ENOUGH_REPLICAS_AFTER_APPEND (it is in the log, but on fewer replicas than
asked), else NONE. This is Kafka's `checkEnoughReplicasReachOffset`.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.api import ACKS_ALL
from protocol.errors import DwalError, ErrorCode

UNKNOWN_OFFSET = -1  # a follower's LEO before its first fetch in this leader epoch
REPLICA_LAG_TIME_MAX_MS_DEFAULT = 10_000  # Kafka's replica.lag.time.max.ms


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowerSnapshot:
    replica_id: int
    log_end_offset: int  # its last fetch offset; UNKNOWN_OFFSET before the first
    last_caught_up_ms: int
    last_fetch_ms: int | None  # None before the first fetch in this leader epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionReplicasSnapshot:
    leader_id: int
    leader_epoch: int
    partition_epoch: int
    high_watermark: int
    leader_log_end_offset: int
    leader_acknowledged_offset: int
    isr: tuple[int, ...]  # committed (in the metadata image)
    maximal_isr: tuple[int, ...]  # committed plus a pending expansion's new members
    pending_isr: tuple[int, ...] | None  # the ISR asked of the controller, if any
    followers: tuple[FollowerSnapshot, ...]


class _Follower:
    __slots__ = ("log_end_offset", "last_caught_up_ms", "last_fetch_ms", "last_fetch_leader_leo")

    def __init__(self, now_ms: int) -> None:
        self.log_end_offset = UNKNOWN_OFFSET
        self.last_caught_up_ms = now_ms  # the benefit of the doubt, as Kafka gives it
        self.last_fetch_ms: int | None = None
        self.last_fetch_leader_leo = UNKNOWN_OFFSET  # the leader's LEO at that fetch


class PartitionReplicas:
    """Leader-side replica state of one partition (see the module's theory of operation)."""

    def __init__(
        self,
        *,
        leader_id: int,
        leader_epoch: int,
        partition_epoch: int,
        replicas: tuple[int, ...],
        isr: tuple[int, ...],
        log_end_offset: int,
        high_watermark: int,
        leader_epoch_start_offset: int,
        now_ms: int,
        acknowledged_offset: int | None = None,
        replica_lag_time_max_ms: int = REPLICA_LAG_TIME_MAX_MS_DEFAULT,
    ) -> None:
        """State for a broker that just became leader. `acknowledged_offset` is the leader's
        own (None: its log end offset); `leader_epoch_start_offset` is the first offset
        of `leader_epoch` in the leader's log (its LEO when it became leader). When the
        leader is alone in the ISR, the HW starts at its acknowledged offset already: read
        `high_watermark` after construction."""
        if acknowledged_offset is None:
            acknowledged_offset = log_end_offset
        assert len(set(replicas)) == len(replicas) and leader_id in replicas, replicas
        _check_isr(isr, leader_id, replicas)
        assert 0 <= acknowledged_offset <= log_end_offset, (acknowledged_offset, log_end_offset)
        assert 0 <= high_watermark <= log_end_offset, (high_watermark, log_end_offset)
        assert 0 <= leader_epoch_start_offset <= log_end_offset, leader_epoch_start_offset
        assert replica_lag_time_max_ms > 0, replica_lag_time_max_ms
        self.leader_id = leader_id
        self.leader_epoch = leader_epoch
        self.partition_epoch = partition_epoch
        self.replicas = tuple(replicas)
        self.isr = tuple(isr)
        self.pending_isr: tuple[int, ...] | None = None
        self.log_end_offset = log_end_offset
        self.acknowledged_offset = acknowledged_offset
        self.high_watermark = high_watermark
        self.leader_epoch_start_offset = leader_epoch_start_offset
        self.replica_lag_time_max_ms = replica_lag_time_max_ms
        self._followers = {
            replica: _Follower(now_ms) for replica in replicas if replica != leader_id
        }
        self._advance_high_watermark()

    # ------------------------------------------------------------------ ISR views

    @property
    def maximal_isr(self) -> tuple[int, ...]:
        """The committed ISR plus the new members of a pending expansion (a pending shrink
        removes no one): the replicas the HW waits for."""
        if self.pending_isr is None:
            return self.isr
        return self.isr + tuple(r for r in self.pending_isr if r not in self.isr)

    # ------------------------------------------------------------------ progress

    def leader_progress(self, log_end_offset: int, acknowledged_offset: int) -> int | None:
        """The leader's log grew or its acknowledged offset advanced (neither moves back
        while it leads). Returns the new HW if it moved, else None."""
        assert log_end_offset >= self.log_end_offset, (log_end_offset, self.log_end_offset)
        assert self.acknowledged_offset <= acknowledged_offset <= log_end_offset, (
            self.acknowledged_offset,
            acknowledged_offset,
            log_end_offset,
        )
        self.log_end_offset = log_end_offset
        self.acknowledged_offset = acknowledged_offset
        return self._advance_high_watermark()

    def follower_fetched(self, replica_id: int, fetch_offset: int, now_ms: int) -> int | None:
        """A follower fetched at `fetch_offset` (its LEO). Returns the new HW if it moved,
        else None. Raises DwalError NOT_LEADER_OR_FOLLOWER when `replica_id` is not a
        follower of this partition, OFFSET_OUT_OF_RANGE when `fetch_offset` is negative or
        beyond the leader's LEO (the shell answers such a fetch without recording it)."""
        follower = self._followers.get(replica_id)
        if follower is None:
            raise DwalError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"broker {replica_id} is not a follower of this partition "
                f"(replicas {list(self.replicas)}, leader {self.leader_id})",
            )
        if not 0 <= fetch_offset <= self.log_end_offset:
            raise DwalError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"fetch offset {fetch_offset} of broker {replica_id} is outside "
                f"[0, {self.log_end_offset}]",
            )
        if fetch_offset >= self.log_end_offset:
            caught_up_ms: int | None = now_ms
        elif follower.last_fetch_ms is not None and fetch_offset >= follower.last_fetch_leader_leo:
            caught_up_ms = follower.last_fetch_ms
        else:
            caught_up_ms = None
        if caught_up_ms is not None:
            follower.last_caught_up_ms = max(follower.last_caught_up_ms, caught_up_ms)
        follower.log_end_offset = fetch_offset
        follower.last_fetch_ms = now_ms
        follower.last_fetch_leader_leo = self.log_end_offset
        return self._advance_high_watermark()

    def _acknowledged(self, replica_id: int) -> int:
        if replica_id == self.leader_id:
            return self.acknowledged_offset
        return self._followers[replica_id].log_end_offset

    def _advance_high_watermark(self) -> int | None:
        candidate = min(self._acknowledged(member) for member in self.maximal_isr)
        if candidate <= self.high_watermark:
            return None
        self.high_watermark = candidate
        return candidate

    # ------------------------------------------------------------------ ISR changes

    def lagging(self, replica_id: int, now_ms: int) -> bool:
        """Whether a follower lags: it lacks some of the leader's log and was last caught
        up more than replica_lag_time_max_ms before `now_ms`."""
        follower = self._followers[replica_id]
        return (
            follower.log_end_offset < self.log_end_offset
            and now_ms - follower.last_caught_up_ms > self.replica_lag_time_max_ms
        )

    def isr_change_wanted(self, now_ms: int) -> tuple[int, ...] | None:
        """The ISR to ask the controller for, or None (no change wanted, or one is already
        in flight). A shrink (every lagging member out) comes before an expansion (every
        eligible non-member in); the leader stays. Changes nothing: call `isr_change_sent`
        once the request is on its way."""
        if self.pending_isr is not None:
            return None
        lagging = {m for m in self.isr if m != self.leader_id and self.lagging(m, now_ms)}
        if lagging:
            return tuple(member for member in self.isr if member not in lagging)
        joining = tuple(
            replica
            for replica in self.replicas
            if replica not in self.isr and self._eligible(replica, now_ms)
        )
        if joining:
            return self.isr + joining
        return None

    def _eligible(self, replica_id: int, now_ms: int) -> bool:
        offset = self._followers[replica_id].log_end_offset
        return (
            offset >= self.high_watermark
            and offset >= self.leader_epoch_start_offset
            and not self.lagging(replica_id, now_ms)
        )

    def isr_change_sent(self, isr: tuple[int, ...]) -> None:
        """An AlterPartition request for `isr` (based on `partition_epoch`) is on its way.
        Only one may be in flight (asserted). From now on the maximal ISR includes the new
        members of an expansion; the HW cannot move on it, so nothing is returned."""
        assert self.pending_isr is None, f"ISR change {self.pending_isr} already in flight"
        _check_isr(isr, self.leader_id, self.replicas)
        self.pending_isr = tuple(isr)

    def isr_change_committed(
        self,
        isr: tuple[int, ...],
        partition_epoch: int,
        *,
        replicas: tuple[int, ...] | None = None,
        now_ms: int = 0,
    ) -> int | None:
        """The metadata image shows the partition at `partition_epoch` with `isr` (and
        `replicas`, None: unchanged) in the same leader epoch. A newer partition epoch settles
        any change in flight - ours accepted, or another change (the controller's) that made
        ours stale. The same partition epoch is a republished image: nothing changes, a
        pending change stays pending. A new follower (a reassignment added it) starts
        unknown and caught up at `now_ms`, as at a leader's start. Returns the new HW if it
        moved (a committed shrink can let it advance), else None."""
        assert partition_epoch >= self.partition_epoch, (partition_epoch, self.partition_epoch)
        if partition_epoch == self.partition_epoch:
            assert tuple(isr) == self.isr, (isr, self.isr, partition_epoch)
            return None
        if replicas is not None and tuple(replicas) != self.replicas:
            assert len(set(replicas)) == len(replicas) and self.leader_id in replicas, replicas
            self.replicas = tuple(replicas)
            self._followers = {
                replica: self._followers.get(replica) or _Follower(now_ms)
                for replica in replicas
                if replica != self.leader_id
            }
        _check_isr(isr, self.leader_id, self.replicas)
        self.isr = tuple(isr)
        self.partition_epoch = partition_epoch
        self.pending_isr = None
        return self._advance_high_watermark()

    def isr_change_failed(self) -> int | None:
        """The change in flight was refused or timed out (no-op when none is): the maximal
        ISR is the committed one again, and a later `isr_change_wanted` may propose anew.
        Returns the new HW if it moved (a dropped expansion can let it advance), else None."""
        self.pending_isr = None
        return self._advance_high_watermark()

    # ------------------------------------------------------------------ acks

    def check_append(self, acks: int, min_insync_replicas: int) -> ErrorCode | None:
        """Before appending: NOT_ENOUGH_REPLICAS for an acks=all write while the committed
        ISR is smaller than `min_insync_replicas`, else None (append)."""
        if acks == ACKS_ALL and len(self.isr) < min_insync_replicas:
            return ErrorCode.NOT_ENOUGH_REPLICAS
        return None

    def acks_all_result(self, end_offset: int, min_insync_replicas: int) -> ErrorCode | None:
        """The answer to an appended acks=all write whose last offset is `end_offset - 1`:
        None while the HW is below `end_offset` (keep waiting); once it is not,
        NOT_ENOUGH_REPLICAS_AFTER_APPEND if the maximal ISR is smaller than
        `min_insync_replicas`, else ErrorCode.NONE (acknowledged)."""
        if self.high_watermark < end_offset:
            return None
        if len(self.maximal_isr) < min_insync_replicas:
            return ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND
        return ErrorCode.NONE

    # ------------------------------------------------------------------ describe

    def snapshot(self) -> PartitionReplicasSnapshot:
        """A frozen copy of the state, for describe and tests."""
        return PartitionReplicasSnapshot(
            leader_id=self.leader_id,
            leader_epoch=self.leader_epoch,
            partition_epoch=self.partition_epoch,
            high_watermark=self.high_watermark,
            leader_log_end_offset=self.log_end_offset,
            leader_acknowledged_offset=self.acknowledged_offset,
            isr=self.isr,
            maximal_isr=self.maximal_isr,
            pending_isr=self.pending_isr,
            followers=tuple(
                FollowerSnapshot(
                    replica_id=replica_id,
                    log_end_offset=follower.log_end_offset,
                    last_caught_up_ms=follower.last_caught_up_ms,
                    last_fetch_ms=follower.last_fetch_ms,
                )
                for replica_id, follower in self._followers.items()
            ),
        )


def _check_isr(isr: tuple[int, ...], leader_id: int, replicas: tuple[int, ...]) -> None:
    assert len(set(isr)) == len(isr), f"ISR {isr} has duplicates"
    assert leader_id in isr, f"ISR {isr} lacks the leader {leader_id}"
    assert set(isr) <= set(replicas), f"ISR {isr} is not within the replicas {replicas}"
