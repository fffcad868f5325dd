"""The classic group state machine (broker/groups/classic_group.py): Kafka's JoinGroup /
SyncGroup / Heartbeat / LeaveGroup rules, driven with explicit times, no I/O.

A `Driver` holds the group, the time, and the requests waiting for an answer (as the
coordinator's shell does); it delivers the group's outbox after every call and checks that
each answer goes to exactly one waiting request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.groups.classic_group import (
    ClassicGroup,
    decode_consumer_assignment,
    decode_consumer_subscription,
)
from broker.groups.group_types import (
    ClassicGroupState,
    ClassicJoinRequest,
    ClassicJoinResponse,
    ClassicSyncRequest,
    ClassicSyncResponse,
    GroupConfig,
    GroupError,
)
from protocol import ErrorCode

SESSION_MS = 10_000
REBALANCE_MS = 30_000
DELAY_MS = 100


def config(**fields) -> GroupConfig:
    values = dict(
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        classic_initial_rebalance_delay_ms=0,
        classic_session_timeout_ms_min=1_000,
        members_max=10,
    )
    values.update(fields)
    return GroupConfig(**values)  # type: ignore[arg-type]


class Ids:
    def __init__(self) -> None:
        self.issued = 0

    def __call__(self, client_id: str) -> str:
        self.issued += 1
        return f"{client_id or 'm'}-{self.issued}"


@dataclass
class Driver:
    group_config: GroupConfig = field(default_factory=config)
    now_ms: int = 0
    group: ClassicGroup = field(init=False)
    waiting: set[tuple[str, str]] = field(default_factory=set)
    answers: dict[tuple[str, str], list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group = ClassicGroup("g", self.group_config, Ids())

    def deliver(self) -> None:
        for answer in self.group.take_answers():
            key = (answer.member_id, answer.kind)
            assert key in self.waiting, f"answer to nobody: {answer}"
            self.waiting.discard(key)
            self.answers.setdefault(key, []).append(answer.join or answer.sync)
            if answer.join is not None and answer.join.error_code == ErrorCode.NONE:
                assert answer.join.generation_id == self.group.generation_id
                assert self.group.has_member(answer.member_id)
            if answer.sync is not None and answer.sync.error_code == ErrorCode.NONE:
                assert self.group.state == ClassicGroupState.STABLE

    def answer(self, member_id: str, kind: str):
        """The answer delivered to the member's waiting request (exactly one), or None."""
        got = self.answers.pop((member_id, kind), [])
        assert len(got) <= 1
        return got[0] if got else None

    def join(
        self,
        member_id: str = "",
        protocols=(("range", b"r"),),
        *,
        instance_id: str | None = None,
        required: bool = True,
        session_ms: int = SESSION_MS,
        rebalance_ms: int = REBALANCE_MS,
        protocol_type: str = "consumer",
        skip: bool = False,
    ) -> ClassicJoinResponse | str:
        """The immediate response, or the member id whose answer is pending."""
        request = ClassicJoinRequest(
            member_id=member_id,
            instance_id=instance_id,
            client_id="c",
            session_timeout_ms=session_ms,
            rebalance_timeout_ms=rebalance_ms,
            protocol_type=protocol_type,
            protocols=tuple(protocols),
            member_id_required=required,
            supports_skip_assignment=skip,
        )
        outcome = self.group.join(request, now_ms=self.now_ms)
        if outcome.response is None:
            self.waiting.add((outcome.member_id, "join"))
        self.deliver()
        check_invariants(self.group)
        return outcome.response if outcome.response is not None else outcome.member_id

    def new_member(self, **fields) -> str:
        """KIP-394: the first join gets an id, the second waits; returns the id."""
        first = self.join(**fields)
        assert isinstance(first, ClassicJoinResponse)
        assert first.error_code == ErrorCode.MEMBER_ID_REQUIRED
        pending = self.join(first.member_id, **fields)
        assert pending == first.member_id
        return first.member_id

    def sync(self, member_id: str, generation: int, assignments=(), **fields):
        request = ClassicSyncRequest(
            member_id=member_id,
            generation_id=generation,
            assignments=tuple(assignments),
            **fields,
        )
        outcome = self.group.sync(request, now_ms=self.now_ms)
        if outcome.response is None:
            self.waiting.add((member_id, "sync"))
        self.deliver()
        check_invariants(self.group)
        return outcome.response

    def heartbeat(self, member_id: str, generation: int, instance_id=None) -> ErrorCode:
        try:
            return self.group.heartbeat(member_id, generation, instance_id, now_ms=self.now_ms)
        except GroupError as error:
            return error.code

    def leave(self, *members: tuple[str, str | None]) -> list[ErrorCode]:
        result = self.group.leave(list(members), now_ms=self.now_ms)
        self.deliver()
        check_invariants(self.group)
        return result

    def tick(self, to_ms: int) -> list[str]:
        self.now_ms = to_ms
        expired = self.group.tick(now_ms=to_ms)
        self.deliver()
        check_invariants(self.group)
        return expired

    def stable_group(self, count: int) -> list[str]:
        """`count` members joined and synced (the first leads); returns their ids."""
        ids: list[str] = []
        for _ in range(count):
            ids.append(self.new_member())
            for other in ids[:-1]:  # the others rejoin: the barrier completes
                if (other, "join") not in self.waiting:
                    self.join(other)
        assert self.group.state == ClassicGroupState.COMPLETING_REBALANCE
        assert not self.waiting
        self.answers.clear()
        generation = self.group.generation_id
        assignments = [(m, m.encode()) for m in ids]
        for member_id in ids[1:]:
            self.sync(member_id, generation)
        self.sync(ids[0], generation, assignments)
        for member_id in ids:
            assert self.answer(member_id, "sync").assignment == member_id.encode()
        assert self.group.state == ClassicGroupState.STABLE
        return ids


def check_invariants(group: ClassicGroup) -> None:
    description = group.describe()
    members = {m.member_id for m in description.members}
    if description.state in (
        ClassicGroupState.COMPLETING_REBALANCE,
        ClassicGroupState.STABLE,
    ):
        assert members and description.leader_id in members
        assert description.protocol_name is not None
        assert not any(m.awaiting_join for m in description.members)
    if description.state == ClassicGroupState.STABLE:
        assert not any(m.awaiting_sync for m in description.members)
    if description.state == ClassicGroupState.EMPTY:
        assert not members
    if description.state != ClassicGroupState.COMPLETING_REBALANCE:
        assert not any(m.awaiting_sync for m in description.members)
    if members:
        assert description.leader_id in members


def error_of(call) -> ErrorCode:
    with pytest.raises(GroupError) as caught:
        call()
    return caught.value.code


# -- joining ------------------------------------------------------------------------------


def test_first_join_without_member_id_answers_member_id_required_kip_394():
    driver = Driver()
    first = driver.join()
    assert isinstance(first, ClassicJoinResponse)
    assert first.error_code == ErrorCode.MEMBER_ID_REQUIRED and first.member_id
    assert driver.group.member_count == 0 and not driver.group.is_empty  # an id is pending
    driver.join(first.member_id)
    response = driver.answer(first.member_id, "join")
    assert response.error_code == ErrorCode.NONE
    assert response.generation_id == 1 and response.leader_id == first.member_id
    assert response.protocol_type == "consumer" and response.protocol_name == "range"
    assert [(m.member_id, m.metadata) for m in response.members] == [(first.member_id, b"r")]
    assert driver.group.state == ClassicGroupState.COMPLETING_REBALANCE


def test_join_before_v4_is_admitted_at_once():
    driver = Driver()
    member_id = driver.join(required=False)
    assert isinstance(member_id, str)
    assert driver.answer(member_id, "join").generation_id == 1


def test_an_unused_member_id_expires_after_the_session_timeout():
    driver = Driver()
    first = driver.join()
    assert isinstance(first, ClassicJoinResponse)
    driver.tick(SESSION_MS)
    assert driver.group.is_empty
    assert (
        error_of(
            lambda: driver.group.join(
                ClassicJoinRequest(
                    member_id=first.member_id,
                    session_timeout_ms=SESSION_MS,
                    protocol_type="consumer",
                    protocols=(("range", b""),),
                ),
                now_ms=driver.now_ms,
            )
        )
        == ErrorCode.UNKNOWN_MEMBER_ID
    )


def test_initial_rebalance_delay_waits_for_more_members_within_the_rebalance_timeout():
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS))
    first = driver.new_member()
    driver.tick(50)
    second = driver.new_member()
    driver.tick(DELAY_MS)  # a member came during the delay: wait one more
    assert driver.answer(first, "join") is None
    driver.tick(DELAY_MS + 99)
    assert driver.answer(first, "join") is None
    driver.tick(2 * DELAY_MS)
    one, two = driver.answer(first, "join"), driver.answer(second, "join")
    assert one.generation_id == two.generation_id == 1
    assert one.leader_id == first and {m.member_id for m in one.members} == {first, second}
    assert two.members == ()


def test_initial_rebalance_delay_is_bounded_by_the_rebalance_timeout():
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS))
    first = driver.new_member(rebalance_ms=250)
    for at in range(50, 1000, 50):  # members keep coming
        driver.tick(at)
        if driver.answer(first, "join") is not None:
            break
        driver.new_member(rebalance_ms=250)
    assert driver.now_ms == 250


def test_a_join_with_an_unknown_member_id_is_refused():
    driver = Driver()
    driver.stable_group(1)
    assert error_of(lambda: driver.join("ghost")) == ErrorCode.UNKNOWN_MEMBER_ID


def test_session_timeout_outside_the_bounds_is_refused():
    driver = Driver(config(classic_session_timeout_ms_min=6_000))
    assert error_of(lambda: driver.join(session_ms=5_999)) == ErrorCode.INVALID_SESSION_TIMEOUT
    assert driver.group.is_empty


def test_max_group_size():
    driver = Driver(config(members_max=2))
    driver.stable_group(2)
    assert error_of(lambda: driver.join()) == ErrorCode.GROUP_MAX_SIZE_REACHED
    assert error_of(lambda: driver.join(required=False)) == ErrorCode.GROUP_MAX_SIZE_REACHED


# -- protocols ----------------------------------------------------------------------------


def test_protocol_selected_by_members_votes_among_those_all_support():
    driver = Driver()
    a = driver.new_member(protocols=[("roundrobin", b"a"), ("range", b"a2"), ("x", b"")])
    driver.tick(0)
    assert driver.answer(a, "join").protocol_name == "roundrobin"  # alone, its first choice
    b = driver.new_member(protocols=[("range", b"b"), ("roundrobin", b"b2")])
    c = driver.new_member(protocols=[("range", b"c"), ("roundrobin", b"c2")])
    driver.join(a, protocols=[("roundrobin", b"a"), ("range", b"a2"), ("x", b"")])
    leader = driver.answer(a, "join")
    assert leader.protocol_name == "range"  # two votes against one
    assert {m.member_id: m.metadata for m in leader.members} == {a: b"a2", b: b"b", c: b"c"}
    assert driver.answer(b, "join").protocol_name == "range"


def test_a_tie_goes_to_the_leaders_preference():
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS))
    a = driver.new_member(protocols=[("sticky", b""), ("range", b"")])
    b = driver.new_member(protocols=[("range", b""), ("sticky", b"")])
    driver.tick(DELAY_MS)
    driver.tick(2 * DELAY_MS)
    assert driver.answer(a, "join").protocol_name == "sticky"
    assert driver.answer(b, "join").protocol_name == "sticky"


def test_a_member_without_a_protocol_in_common_or_of_another_type_is_refused():
    driver = Driver()
    driver.stable_group(1)
    code = error_of(lambda: driver.join(protocols=[("roundrobin", b"")]))
    assert code == ErrorCode.INCONSISTENT_GROUP_PROTOCOL
    code = error_of(lambda: driver.join(protocol_type="connect"))
    assert code == ErrorCode.INCONSISTENT_GROUP_PROTOCOL
    assert error_of(lambda: driver.join(protocols=[])) == ErrorCode.INCONSISTENT_GROUP_PROTOCOL
    assert driver.group.member_count == 1 and driver.group.state == ClassicGroupState.STABLE


# -- the join barrier and generations -------------------------------------------------------


def test_a_new_member_makes_everyone_rejoin_and_the_barrier_waits_for_all():
    driver = Driver()
    a, b = driver.stable_group(2)
    generation = driver.group.generation_id
    c = driver.new_member()
    assert driver.group.state == ClassicGroupState.PREPARING_REBALANCE
    assert driver.heartbeat(a, generation) == ErrorCode.REBALANCE_IN_PROGRESS
    driver.join(a)
    assert driver.answer(c, "join") is None  # b has not rejoined
    driver.join(b)
    answers = {m: driver.answer(m, "join") for m in (a, b, c)}
    assert {r.generation_id for r in answers.values()} == {generation + 1}
    assert {r.leader_id for r in answers.values()} == {a}
    assert [m.member_id for m in answers[a].members] == [a, b, c]


def test_members_that_do_not_rejoin_within_the_rebalance_timeout_are_removed():
    driver = Driver()
    a, b = driver.stable_group(2)
    generation = driver.group.generation_id
    driver.join(b, rebalance_ms=5_000)  # b changes nothing but is not the leader: answered
    assert isinstance(driver.join(b, protocols=[("range", b"new")], rebalance_ms=5_000), str)
    assert driver.group.state == ClassicGroupState.PREPARING_REBALANCE
    for at in range(9_000, REBALANCE_MS, 9_000):  # a keeps its session, does not rejoin
        driver.tick(at)
        assert driver.heartbeat(a, generation) == ErrorCode.REBALANCE_IN_PROGRESS
    driver.tick(REBALANCE_MS - 1)  # the largest rebalance timeout counts
    assert driver.answer(b, "join") is None
    driver.tick(REBALANCE_MS)
    response = driver.answer(b, "join")
    assert response.generation_id == generation + 1
    assert response.leader_id == b  # the leader was removed
    assert not driver.group.has_member(a)
    assert driver.heartbeat(a, generation) == ErrorCode.UNKNOWN_MEMBER_ID


def test_a_follower_that_changes_nothing_gets_the_current_generation_back():
    driver = Driver()
    a, b = driver.stable_group(2)
    response = driver.join(b)
    assert isinstance(response, ClassicJoinResponse)
    assert response.generation_id == driver.group.generation_id
    assert response.leader_id == a and response.members == ()
    assert driver.group.state == ClassicGroupState.STABLE


def test_the_leader_rejoining_starts_a_rebalance():
    driver = Driver()
    a, b = driver.stable_group(2)
    generation = driver.group.generation_id
    assert driver.join(a) == a
    assert driver.group.state == ClassicGroupState.PREPARING_REBALANCE
    driver.join(b)
    assert driver.answer(a, "join").generation_id == generation + 1


def test_cooperative_rounds_rejoin_with_owned_partitions_until_the_assignor_is_done():
    # cooperative-sticky: after a round that revoked partitions, the members join again
    # (new metadata with what they still own); each round is a generation of its own
    driver = Driver()
    a, b = driver.stable_group(2)
    first = driver.group.generation_id + 1
    for generation, metadata in ((first, b"owned-1"), (first + 1, b"owned-2")):
        driver.join(a, protocols=[("cooperative-sticky", metadata), ("range", b"r")])
        driver.join(b, protocols=[("cooperative-sticky", metadata), ("range", b"r")])
        leader = driver.answer(a, "join")
        assert leader.generation_id == generation
        assert leader.protocol_name == "cooperative-sticky"
        assert {m.metadata for m in leader.members} == {metadata}
        driver.answer(b, "join")
        driver.sync(b, generation)
        driver.sync(a, generation, [(a, b"A"), (b, b"B")])
        assert driver.answer(b, "sync").assignment == b"B"
        assert driver.answer(a, "sync").assignment == b"A"


def test_a_join_sent_again_while_waiting_is_answered_once():
    driver = Driver()
    a, b = driver.stable_group(2)
    generation = driver.group.generation_id
    driver.join(a)
    driver.join(a)  # its first request timed out on the client
    driver.join(b)
    assert driver.answer(a, "join").generation_id == generation + 1


# -- SyncGroup ----------------------------------------------------------------------------


def test_followers_wait_for_the_leaders_assignment():
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS))
    a, b = driver.new_member(), driver.new_member()
    driver.tick(DELAY_MS)
    driver.tick(2 * DELAY_MS)
    driver.answer(a, "join"), driver.answer(b, "join")
    assert driver.sync(b, 1) is None
    assert driver.answer(b, "sync") is None
    assert driver.heartbeat(b, 1) == ErrorCode.NONE  # CompletingRebalance: not an error
    assert driver.sync(a, 1, [(a, b"for a")]) is None  # b's assignment is missing
    assert driver.answer(a, "sync").assignment == b"for a"
    assert driver.answer(b, "sync") == ClassicSyncResponse(
        protocol_type="consumer", protocol_name="range", assignment=b""
    )
    # in Stable, a sync is answered at once with the member's assignment
    assert driver.sync(a, 1).assignment == b"for a"


def test_sync_errors():
    driver = Driver()
    a, b = driver.stable_group(2)
    g = driver.group.generation_id
    assert error_of(lambda: driver.sync("ghost", g)) == ErrorCode.UNKNOWN_MEMBER_ID
    assert error_of(lambda: driver.sync(a, g + 1)) == ErrorCode.ILLEGAL_GENERATION
    code = error_of(lambda: driver.sync(a, g, protocol_name="roundrobin"))
    assert code == ErrorCode.INCONSISTENT_GROUP_PROTOCOL
    code = error_of(lambda: driver.sync(a, g, protocol_type="connect"))
    assert code == ErrorCode.INCONSISTENT_GROUP_PROTOCOL
    driver.join(a)
    assert error_of(lambda: driver.sync(b, g)) == ErrorCode.REBALANCE_IN_PROGRESS


def test_a_rebalance_while_completing_answers_waiting_syncs_rebalance_in_progress():
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS))
    a, b = driver.new_member(), driver.new_member()
    driver.tick(DELAY_MS)
    driver.tick(2 * DELAY_MS)
    driver.answer(a, "join"), driver.answer(b, "join")
    driver.sync(b, 1)
    driver.new_member()
    assert driver.answer(b, "sync").error_code == ErrorCode.REBALANCE_IN_PROGRESS
    assert driver.group.state == ClassicGroupState.PREPARING_REBALANCE


def test_members_that_do_not_sync_within_the_rebalance_timeout_are_removed():
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS))
    a, b = driver.new_member(session_ms=60_000), driver.new_member(session_ms=60_000)
    driver.tick(DELAY_MS)
    driver.tick(2 * DELAY_MS)
    driver.answer(a, "join"), driver.answer(b, "join")
    driver.sync(b, 1)  # the leader never sends its SyncGroup
    driver.tick(2 * DELAY_MS + REBALANCE_MS - 1)
    assert driver.group.has_member(a)
    driver.tick(2 * DELAY_MS + REBALANCE_MS)
    assert not driver.group.has_member(a)
    assert driver.answer(b, "sync").error_code == ErrorCode.REBALANCE_IN_PROGRESS
    driver.join(b)
    response = driver.answer(b, "join")
    assert response.generation_id == 2 and response.leader_id == b


# -- heartbeats, sessions, leaving ------------------------------------------------------------


def test_heartbeat_errors():
    driver = Driver()
    (a,) = driver.stable_group(1)
    assert driver.heartbeat(a, 1) == ErrorCode.NONE
    assert driver.heartbeat(a, 0) == ErrorCode.ILLEGAL_GENERATION
    assert driver.heartbeat("ghost", 1) == ErrorCode.UNKNOWN_MEMBER_ID


def test_a_member_that_stops_heartbeating_is_removed_and_the_others_rebalance():
    driver = Driver()
    a, b = driver.stable_group(2)
    g = driver.group.generation_id
    driver.tick(SESSION_MS - 1)
    assert driver.heartbeat(a, g) == ErrorCode.NONE
    assert driver.tick(SESSION_MS) == [b]
    assert driver.heartbeat(a, g) == ErrorCode.REBALANCE_IN_PROGRESS
    driver.join(a)
    assert driver.answer(a, "join").generation_id == g + 1
    assert driver.group.next_deadline_ms() is not None


def test_leave_group_batch_removes_members_and_reports_each():
    driver = Driver()
    a, b, c = driver.stable_group(3)
    assert driver.leave((a, None), ("ghost", None), (c, None)) == [
        ErrorCode.NONE,
        ErrorCode.UNKNOWN_MEMBER_ID,
        ErrorCode.NONE,
    ]
    assert driver.group.state == ClassicGroupState.PREPARING_REBALANCE
    assert driver.group.leader_id == b
    driver.join(b)
    assert driver.answer(b, "join").generation_id == 4


def test_the_last_member_leaving_empties_the_group():
    driver = Driver()
    (a,) = driver.stable_group(1)
    assert driver.leave((a, None)) == [ErrorCode.NONE]
    assert driver.group.state == ClassicGroupState.EMPTY
    assert driver.group.is_empty and driver.group.generation_id == 2


def test_leaving_while_others_wait_completes_the_barrier():
    driver = Driver()
    a, b = driver.stable_group(2)
    driver.join(a)
    driver.leave((b, None))
    assert driver.answer(a, "join").generation_id == 3


def test_a_member_removed_while_waiting_gets_unknown_member_id():
    driver = Driver()
    a, b = driver.stable_group(2)
    driver.join(b, protocols=[("range", b"x")])
    driver.leave((b, None))
    assert driver.answer(b, "join").error_code == ErrorCode.UNKNOWN_MEMBER_ID


# -- static membership --------------------------------------------------------------------


def test_static_member_joins_without_member_id_required_and_rejoins_without_a_rebalance():
    driver = Driver()
    (a,) = driver.stable_group(1)
    b = driver.join(instance_id="i-1")
    assert isinstance(b, str)  # no MEMBER_ID_REQUIRED for a static member
    driver.join(a)
    driver.answer(a, "join"), driver.answer(b, "join")
    driver.sync(b, 2)
    driver.sync(a, 2, [(a, b"A"), (b, b"B")])
    driver.answer(a, "sync"), driver.answer(b, "sync")
    # the process restarts: same instance id, no member id
    again = driver.join(instance_id="i-1")
    assert isinstance(again, ClassicJoinResponse)
    assert again.member_id != b and again.generation_id == 2 and again.leader_id == a
    assert driver.group.state == ClassicGroupState.STABLE
    assert driver.sync(again.member_id, 2).assignment == b"B"
    # the old process is fenced
    assert driver.heartbeat(b, 2, "i-1") == ErrorCode.FENCED_INSTANCE_ID
    assert driver.heartbeat(b, 2) == ErrorCode.UNKNOWN_MEMBER_ID


def test_a_static_leader_rejoining_rebalances_unless_it_can_skip_assignment():
    driver = Driver()
    a = driver.join(instance_id="leader")
    assert isinstance(a, str)
    driver.answer(a, "join")
    driver.sync(a, 1, [(a, b"A")])
    driver.answer(a, "sync")
    modern = driver.join(instance_id="leader", skip=True)
    assert isinstance(modern, ClassicJoinResponse) and modern.skip_assignment
    assert [m.member_id for m in modern.members] == [modern.member_id]
    older = driver.join(instance_id="leader")
    assert isinstance(older, str)
    assert driver.answer(older, "join").generation_id == 2


def test_a_static_member_that_does_not_rejoin_stays_but_must_sync():
    driver = Driver()
    a = driver.new_member(session_ms=60_000)
    driver.answer(a, "join")
    driver.sync(a, 1, [(a, b"A")])
    driver.answer(a, "sync")
    s = driver.join(instance_id="s", session_ms=100_000)
    driver.join(a, session_ms=60_000)
    driver.answer(a, "join"), driver.answer(s, "join")
    driver.sync(s, 2)
    driver.sync(a, 2)
    driver.answer(a, "sync"), driver.answer(s, "sync")
    driver.join(a, protocols=[("range", b"changed")], session_ms=60_000)
    driver.tick(REBALANCE_MS)  # s did not rejoin: kept (static), a answered
    assert driver.group.has_member(s)
    assert driver.answer(a, "join").generation_id == 3
    driver.sync(a, 3)
    driver.tick(REBALANCE_MS * 2)  # s never synced generation 3: removed
    assert not driver.group.has_member(s)


def test_leave_by_instance_id_and_fenced_leave():
    driver = Driver()
    s = driver.join(instance_id="s")
    driver.answer(s, "join")
    assert driver.leave(("other", "s")) == [ErrorCode.FENCED_INSTANCE_ID]
    assert driver.leave(("", "s")) == [ErrorCode.NONE]
    assert driver.group.is_empty


# -- offset commits -----------------------------------------------------------------------


def test_commit_rules():
    driver = Driver()
    group = driver.group
    group.check_commit("", -1, None, now_ms=0)  # a group without members: simple commit
    a, b = driver.stable_group(2)
    g = group.generation_id
    check = group.check_commit
    assert error_of(lambda: check("", -1, None, now_ms=0)) == ErrorCode.UNKNOWN_MEMBER_ID
    assert error_of(lambda: check("ghost", g, None, now_ms=0)) == ErrorCode.UNKNOWN_MEMBER_ID
    assert error_of(lambda: check(a, g - 1, None, now_ms=0)) == ErrorCode.ILLEGAL_GENERATION
    check(a, g, None, now_ms=0)
    driver.join(a)
    check(b, g, None, now_ms=0)  # rebalancing: the old generation may still commit
    driver.join(b)
    code = error_of(lambda: check(b, g + 1, None, now_ms=0))
    assert code == ErrorCode.REBALANCE_IN_PROGRESS  # until the leader has synced


def test_unload_answers_every_waiting_request_not_coordinator():
    driver = Driver()
    a, b = driver.stable_group(2)
    driver.join(a)
    driver.group.unload()
    driver.deliver()
    assert driver.answer(a, "join").error_code == ErrorCode.NOT_COORDINATOR
    assert error_of(lambda: driver.join(b)) == ErrorCode.COORDINATOR_NOT_AVAILABLE


# -- the embedded consumer protocol ---------------------------------------------------------


def test_consumer_protocol_subscription_and_assignment_are_read():
    from kafka.protocol.consumer.metadata import (  # kafka-python's encoders
        ConsumerProtocolAssignment,
        ConsumerProtocolSubscription,
    )

    metadata = ConsumerProtocolSubscription(0, ["a", "b"], b"").encode()
    assert decode_consumer_subscription(metadata) == ("a", "b")
    owned = [ConsumerProtocolSubscription.TopicPartition(topic="a", partitions=[0])]
    metadata = ConsumerProtocolSubscription(
        version=1, topics=["a"], user_data=b"", owned_partitions=owned
    ).encode()
    assert decode_consumer_subscription(metadata) == ("a",)
    assignment = ConsumerProtocolAssignment(0, [("a", [0, 2]), ("b", [1])], b"").encode()
    assert decode_consumer_assignment(assignment) == {("a", 0), ("a", 2), ("b", 1)}
    assert decode_consumer_assignment(b"") == frozenset()
    assert decode_consumer_assignment(b"\x00\x00\x7f\xff\xff\xff") is None
    assert decode_consumer_subscription(b"\x00") is None


# -- random schedules -----------------------------------------------------------------------


operations = st.lists(
    st.tuples(
        st.sampled_from(["new", "join", "change", "sync", "heartbeat", "leave", "tick"]),
        st.integers(min_value=0, max_value=5),
        st.integers(min_value=0, max_value=15_000),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.booleans())
def test_random_schedules_keep_the_invariants_and_answer_each_request_once(steps, delay):
    driver = Driver(config(classic_initial_rebalance_delay_ms=DELAY_MS if delay else 0))
    known: list[str] = []
    for kind, index, time_ms in steps:
        member = known[index % len(known)] if known else ""
        generation = driver.group.generation_id
        try:
            if kind == "new" or not member:
                result = driver.join(required=False, rebalance_ms=1_000 + time_ms)
                if isinstance(result, str):
                    known.append(result)
            elif kind == "join" and (member, "join") not in driver.waiting:
                driver.join(member)
            elif kind == "change" and (member, "join") not in driver.waiting:
                driver.join(member, protocols=[("range", str(time_ms).encode())])
            elif kind == "sync" and (member, "sync") not in driver.waiting:
                leader = member == driver.group.leader_id
                driver.sync(member, generation, [(m, m.encode()) for m in known] if leader else ())
            elif kind == "heartbeat":
                driver.heartbeat(member, generation)
            elif kind == "leave":
                driver.leave((member, None))
            elif kind == "tick":
                driver.tick(driver.now_ms + time_ms)
        except GroupError:
            pass
        driver.answers.clear()
    # left alone, every member times out and every waiting request is answered
    for _ in range(100):
        deadline = driver.group.next_deadline_ms()
        if deadline is None:
            break
        driver.tick(max(deadline, driver.now_ms))
    assert driver.group.next_deadline_ms() is None
    assert driver.group.is_empty and not driver.waiting
    assert driver.group.state == ClassicGroupState.EMPTY
