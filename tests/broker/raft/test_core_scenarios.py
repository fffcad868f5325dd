"""Data-driven scenarios (etcd's testdata/*.txt): a script of commands, each followed by the
output it must produce, run against the synchronous network of test_core_network.

    command arg key=value ...
    ----
    expected output (possibly empty)

Commands that change things print nothing unless they fail ("error: <Type>", or
"error: livelock" when messages are still flowing after the network's bound of delivery
rounds); `status`, `logs`, `state`, `reads` and `progress` print what they observe. After
changing the core, regenerate the expected outputs with RAFT_SCENARIOS_REWRITE=1 and review
the diff like code.
"""

from __future__ import annotations

import os
import pathlib
import shlex

import pytest
from test_core_network import Network, NotStabilizedError, encode_state

from broker.raft import ConfigChange, ConfigChangeKind, RaftError

TESTDATA = pathlib.Path(__file__).parent / "testdata"
REWRITE = os.environ.get("RAFT_SCENARIOS_REWRITE") == "1"
SEPARATOR = "----"


def _ids(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.isdigit() else text


class Scenario:
    def __init__(self) -> None:
        self.network: Network | None = None

    @property
    def net(self) -> Network:
        assert self.network is not None, "`create` first"
        return self.network

    def run(self, line: str) -> str:
        words = shlex.split(line)
        name, args = words[0], words[1:]
        positional = [a for a in args if "=" not in a]
        options = dict(a.split("=", 1) for a in args if "=" in a)
        handler = getattr(self, "do_" + name.replace("-", "_"))
        try:
            return handler(*positional, **options) or ""
        except RaftError as error:
            return f"error: {type(error).__name__}"
        except NotStabilizedError:
            return "error: livelock"

    def do_create(self, voters: str = "1,2,3", learners: str = "", **config: str) -> None:
        settings = {key: _value(value) for key, value in config.items()}
        self.network = Network.create(voters=_ids(voters), learners=_ids(learners), **settings)

    def do_campaign(self, node: str) -> None:
        self.net.campaign(int(node))

    def do_tick(self, nodes: str = "", n: str = "1") -> None:
        self.net.tick(_ids(nodes) or None, ticks=int(n))

    def do_propose(self, node: str, *data: str) -> None:
        for item in data:
            self.net.nodes[int(node)].propose(item.encode())
        self.net.stabilize()

    def do_isolate(self, node: str) -> None:
        self.net.isolate(int(node))

    def do_cut(self, a: str, b: str) -> None:
        self.net.cut(int(a), int(b))

    def do_recover(self) -> None:
        self.net.recover()

    def do_crash(self, node: str) -> None:
        self.net.crash(int(node))

    def do_restart(self, node: str) -> None:
        self.net.restart(int(node))
        self.net.stabilize()

    def do_lose(self, node: str, keep: str) -> None:
        self.net.lose_entries(int(node), int(keep))
        self.net.stabilize()

    def do_wipe(self, node: str) -> None:
        self.net.lose_entries(int(node), 0, wipe=True)
        self.net.stabilize()

    def do_add_node(self, node: str) -> None:
        self.net.add_node(int(node))

    def do_change(self, leader: str, kind: str, node: str) -> None:
        change = ConfigChange(
            kind=ConfigChangeKind[kind.upper().replace("-", "_")], node_id=int(node)
        )
        self.net.nodes[int(leader)].propose_config_change(change)
        self.net.stabilize()

    def do_transfer(self, leader: str, target: str) -> None:
        self.net.nodes[int(leader)].transfer_leadership(int(target))
        self.net.stabilize()

    def do_read(self, node: str, context: str) -> None:
        self.net.nodes[int(node)].read_index(context.encode())
        self.net.stabilize()

    def do_compact(self, node: str) -> None:
        raft = self.net.nodes[int(node)]
        raft.compact(raft.applied_index, encode_state(self.net.state[int(node)]))

    def do_status(self) -> str:
        lines = []
        for node_id, node in sorted(self.net.nodes.items()):
            configuration = node.configuration
            crashed = " (crashed)" if node_id in self.net.crashed else ""
            lines.append(
                f"{node_id}: {node.role.value} term={node.term} leader={node.leader} "
                f"commit={node.commit_index} applied={node.applied_index} "
                f"last={node.last_index} voters={_join(configuration.voters)} "
                f"learners={_join(configuration.learners)}{crashed}"
            )
        return "\n".join(lines)

    def do_logs(self) -> str:
        lines = []
        for node_id, storage in sorted(self.net.storages.items()):
            terms = " ".join(str(term) for term in self.net.log_terms(node_id))
            lines.append(f"{node_id}: snapshot={storage.snapshot().index} terms=[{terms}]")
        return "\n".join(lines)

    def do_state(self) -> str:
        return "\n".join(
            f"{node_id}: {' '.join(item.decode() for item in state)}".rstrip()
            for node_id, state in sorted(self.net.state.items())
        )

    def do_progress(self, leader: str) -> str:
        progress = self.net.nodes[int(leader)].status().progress
        return "\n".join(
            f"{node_id}: match={item.match} next={item.next} state={item.state.value}"
            for node_id, item in sorted(progress.items())
        )

    def do_reads(self) -> str:
        lines = []
        for node_id, states in sorted(self.net.read_states.items()):
            for state in states:
                lines.append(f"{node_id}: {state.request_context.decode()} index={state.index}")
        return "\n".join(lines)


def _join(ids: frozenset[int]) -> str:
    return ",".join(str(i) for i in sorted(ids))


def parse(text: str) -> list[tuple[str, str]]:
    """[(command, expected output)]; blank lines and # comments separate commands."""
    cases: list[tuple[str, str]] = []
    lines = text.splitlines()
    position = 0
    while position < len(lines):
        line = lines[position].strip()
        position += 1
        if not line or line.startswith("#"):
            continue
        assert lines[position].strip() == SEPARATOR, f"expected {SEPARATOR} after {line!r}"
        position += 1
        output = []
        while position < len(lines) and lines[position].strip():
            output.append(lines[position].rstrip())
            position += 1
        cases.append((line, "\n".join(output)))
    return cases


def render(text: str, outputs: list[str]) -> str:
    """The file `text` with each command's output replaced by `outputs`, comments kept."""
    result, lines, position, case = [], text.splitlines(), 0, 0
    while position < len(lines):
        line = lines[position]
        position += 1
        if not line.strip() or line.strip().startswith("#"):
            result.append(line)
            continue
        result += [line, SEPARATOR]
        position += 1
        while position < len(lines) and lines[position].strip():
            position += 1
        if outputs[case]:
            result.append(outputs[case])
        case += 1
    return "\n".join(result) + "\n"


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txt")), ids=lambda p: p.stem)
def test_scenario(path):
    text = path.read_text()
    scenario = Scenario()
    outputs = []
    for command, expected in parse(text):
        actual = scenario.run(command)
        outputs.append(actual)
        if not REWRITE:
            assert actual == expected, f"{path.name}: {command}"
    if REWRITE:
        path.write_text(render(text, outputs))
