"""A synchronous in-memory network of RaftNodes (etcd's raft_test.go `network`), and its tests.

Every node has a MemoryStorage as its disk and a list of applied data as its state machine.
`stabilize()` runs the driver loop of every node (persist, send, apply, advance) and delivers
messages until nothing moves. Faults: `cut(a, b)` and `isolate(node)` drop messages between
nodes, `drop_if(predicate)` drops chosen messages, `crash(node)` silences a node and
`restart(node)` brings it back from its storage; `lose_entries(node, keep)` restarts a node
whose disk lost acknowledged entries; `recover()` heals every link and filter. A network
that never falls quiet (a livelock) raises NotStabilizedError.
After every delivery round the network checks state-machine safety: no two nodes ever
apply different entries at the same index, and there is at most one leader per term.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import msgpack

from broker.raft import (
    Configuration,
    Entry,
    EntryKind,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RaftConfig,
    RaftNode,
    ReadState,
    Role,
)

MessageFilter = Callable[[Message], bool]


class NotStabilizedError(AssertionError):
    """Messages kept flowing for max_rounds delivery rounds: a livelock."""


class Network:
    def __init__(self, *, seed: int = 0, **config: object) -> None:
        self.seed = seed
        self.config = config
        self.nodes: dict[int, RaftNode] = {}
        self.storages: dict[int, MemoryStorage] = {}
        self.state: dict[int, list[bytes]] = {}  # the applied NORMAL entries' data
        self.applied: dict[int, list[Entry]] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.crashed: set[int] = set()
        self.sent: list[Message] = []  # every message any node emitted, in order
        self.delivered: list[Message] = []
        self._cut: set[tuple[int, int]] = set()
        self._filters: list[MessageFilter] = []
        self._queue: list[Message] = []
        self._committed: dict[int, Entry] = {}  # index -> the entry applied there
        self._leaders: dict[int, int] = {}  # term -> leader
        self.report_snapshots = True
        # (rng, duplicate probability): reorder each delivery round and duplicate messages.
        self.disorder: tuple[random.Random, float] | None = None

    @classmethod
    def create(
        cls, voters: Iterable[int] = (1, 2, 3), learners: Iterable[int] = (), **kwargs: object
    ) -> Network:
        seed = int(kwargs.pop("seed", 0))  # type: ignore[call-overload]
        network = cls(seed=seed, **kwargs)
        configuration = Configuration(voters=frozenset(voters), learners=frozenset(learners))
        for node_id in sorted(configuration.members):
            network.add_node(node_id, MemoryStorage(configuration))
        return network

    def add_node(self, node_id: int, storage: MemoryStorage | None = None) -> RaftNode:
        """Start a node; without storage, a fresh node outside any configuration (to join)."""
        if storage is None:
            storage = MemoryStorage(Configuration(voters=frozenset()))
        self.storages[node_id] = storage
        self.state[node_id] = decode_state(storage.snapshot().data)
        self.applied[node_id] = []
        self.read_states[node_id] = []
        self.nodes[node_id] = self._new_node(node_id)
        return self.nodes[node_id]

    def _new_node(self, node_id: int) -> RaftNode:
        config = RaftConfig(node_id=node_id, **self.config)  # type: ignore[arg-type]
        return RaftNode(config, self.storages[node_id], random.Random(self.seed * 1000 + node_id))

    # -- faults ---------------------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        self._cut |= {(a, b), (b, a)}

    def isolate(self, node_id: int) -> None:
        for other in self.nodes:
            if other != node_id:
                self.cut(node_id, other)

    def drop_if(self, predicate: MessageFilter) -> None:
        self._filters.append(predicate)

    def recover(self) -> None:
        self._cut.clear()
        self._filters.clear()

    def crash(self, node_id: int) -> None:
        """The node stops; what it did not persist is lost (here: nothing, as each Ready is
        persisted before the next one is taken)."""
        self.crashed.add(node_id)

    def restart(self, node_id: int) -> RaftNode:
        """A new RaftNode on the node's storage; its state machine restarts from the
        storage's snapshot and is rebuilt by re-applying the committed entries."""
        self.crashed.discard(node_id)
        storage = self.storages[node_id]
        self.state[node_id] = decode_state(storage.snapshot().data)
        self.nodes[node_id] = self._new_node(node_id)
        return self.nodes[node_id]

    def lose_entries(self, node_id: int, keep: int, *, wipe: bool = False) -> RaftNode:
        """Restart node_id with only its first `keep` entries, as after a disk that lied
        about fsync (or was restored from an old copy): entries it acknowledged are gone.
        Term and vote survive (commit is clamped to `keep`) unless `wipe`, which leaves
        nothing but the bootstrap configuration, as a replaced disk would."""
        old = self.storages[node_id]
        assert old.snapshot().index == 0, "lose_entries works on uncompacted logs"
        hard_state, configuration = old.initial_state()
        if wipe:
            storage = MemoryStorage(configuration)
        else:
            hard_state = HardState(
                term=hard_state.term, vote=hard_state.vote, commit=min(hard_state.commit, keep)
            )
            storage = MemoryStorage(configuration, hard_state)
            keep = min(keep, old.last_index())
            if keep:
                storage.append(old.entries(1, keep + 1))
        self.storages[node_id] = storage
        self.crashed.add(node_id)
        return self.restart(node_id)

    def _blocked(self, message: Message) -> bool:
        if message.target not in self.nodes or message.target in self.crashed:
            return True
        if (message.source, message.target) in self._cut:
            return True
        return any(predicate(message) for predicate in self._filters)

    # -- running --------------------------------------------------------------------------

    def process(self, node_id: int) -> None:
        """Run the driver loop of one node: persist, queue the messages, apply, advance."""
        node, storage = self.nodes[node_id], self.storages[node_id]
        while node.has_ready():
            ready = node.ready()
            if ready.snapshot is not None:
                storage.apply_snapshot(ready.snapshot)
                self.state[node_id] = decode_state(ready.snapshot.data)
            storage.append(ready.entries)
            if ready.hard_state is not None:
                storage.set_hard_state(ready.hard_state)
            self.sent.extend(ready.messages)
            self._queue.extend(ready.messages)
            for entry in ready.committed_entries:
                self._apply(node_id, entry)
            self.read_states[node_id].extend(ready.read_states)
            node.advance(ready)
            self._check_one_leader_per_term(node)

    def _apply(self, node_id: int, entry: Entry) -> None:
        known = self._committed.setdefault(entry.index, entry)
        assert known == entry, f"node {node_id} applied {entry} where {known} was applied"
        self.applied[node_id].append(entry)
        if entry.kind == EntryKind.NORMAL and entry.data:
            self.state[node_id].append(entry.data)

    def _check_one_leader_per_term(self, node: RaftNode) -> None:
        if node.role == Role.LEADER:
            leader = self._leaders.setdefault(node.term, node.node_id)
            assert leader == node.node_id, f"two leaders in term {node.term}"

    def stabilize(self, max_rounds: int = 1000) -> None:
        """Process readies and deliver messages until no node has anything to do."""
        for _ in range(max_rounds):
            for node_id in sorted(self.nodes):
                if node_id not in self.crashed:
                    self.process(node_id)
            if not self._queue:
                return
            queue, self._queue = self._queue, []
            if self.disorder is not None:
                rng, duplicate_probability = self.disorder
                queue += [m for m in queue if rng.random() < duplicate_probability]
                rng.shuffle(queue)
            for message in queue:
                blocked = self._blocked(message)
                if not blocked:
                    self.delivered.append(message)
                    self.nodes[message.target].step(message)
                if message.type == MessageType.SNAPSHOT and self.report_snapshots:
                    # What a driver does once its transport sent (or failed to send) it.
                    if message.source not in self.crashed:
                        self.nodes[message.source].report_snapshot(message.target, not blocked)
        raise NotStabilizedError(f"the network did not stabilize in {max_rounds} rounds")

    def send(self, *messages: Message) -> None:
        """Inject messages (as if from their sources), then stabilize."""
        self._queue.extend(messages)
        self.stabilize()

    def tick(self, node_ids: Iterable[int] | None = None, ticks: int = 1) -> None:
        """Tick the given (default: all running) nodes `ticks` times, stabilizing after each."""
        ids = sorted(self.nodes if node_ids is None else node_ids)
        for _ in range(ticks):
            for node_id in ids:
                if node_id not in self.crashed:
                    self.nodes[node_id].tick()
            self.stabilize()

    def campaign(self, node_id: int) -> None:
        self.nodes[node_id].campaign()
        self.stabilize()

    def elect(self, node_id: int, attempts: int = 5) -> RaftNode:
        """Campaign until node_id leads (a campaign may first only learn a newer term)."""
        for _ in range(attempts):
            self.campaign(node_id)
            if self.nodes[node_id].role == Role.LEADER:
                return self.nodes[node_id]
        raise AssertionError(f"node {node_id} did not become leader")

    def tick_until_leader(self, node_ids: Iterable[int] | None = None, ticks: int = 100) -> int:
        ids = sorted(self.nodes if node_ids is None else node_ids)
        for _ in range(ticks):
            self.tick(ids)
            leaders = [i for i in ids if self.nodes[i].role == Role.LEADER]
            if leaders:
                return leaders[0]
        raise AssertionError("no leader was elected")

    def propose(self, node_id: int, *data: bytes) -> list[int]:
        indexes = [self.nodes[node_id].propose(item) for item in data]
        self.stabilize()
        return indexes

    # -- observation ----------------------------------------------------------------------

    def leaders(self) -> list[int]:
        return [i for i, node in sorted(self.nodes.items()) if node.role == Role.LEADER]

    def log_terms(self, node_id: int) -> list[int]:
        """Terms of the node's stored entries, from its first index."""
        storage = self.storages[node_id]
        if storage.last_index() < storage.first_index():
            return []
        entries = storage.entries(storage.first_index(), storage.last_index() + 1)
        return [entry.term for entry in entries]

    def sent_of(self, kind: MessageType, source: int | None = None, target: int | None = None):
        return [
            m
            for m in self.sent
            if m.type == kind
            and (source is None or m.source == source)
            and (target is None or m.target == target)
        ]


def encode_state(state: list[bytes]) -> bytes:
    return msgpack.packb(state, use_bin_type=True)


def decode_state(data: bytes) -> list[bytes]:
    return list(msgpack.unpackb(data)) if data else []


def log_storage(configuration: Configuration, terms: list[int], term: int) -> MemoryStorage:
    """A MemoryStorage holding entries 1..len(terms) of the given terms, at hard state term."""
    storage = MemoryStorage(configuration, HardState(term=term))
    storage.append([Entry(term=t, index=i) for i, t in enumerate(terms, start=1)])
    return storage


# -- tests of the network itself -----------------------------------------------------------


def test_stabilize_delivers_until_quiet_and_elects():
    network = Network.create()
    network.campaign(1)
    assert network.leaders() == [1]
    assert all(node.leader == 1 for node in network.nodes.values())
    assert not any(node.has_ready() for node in network.nodes.values())


def test_cut_and_isolate_drop_messages_until_recover():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    network.propose(1, b"a")
    assert network.state[3] == [] and network.state[2] == [b"a"]
    network.recover()
    network.tick([1])
    assert network.state[3] == [b"a"]


def test_drop_if_filters_chosen_messages():
    network = Network.create()
    network.elect(1)
    network.drop_if(lambda m: m.type == MessageType.APPEND and m.target == 2)
    network.propose(1, b"a")
    assert network.state[2] == []
    assert network.state[3] == [b"a"]
