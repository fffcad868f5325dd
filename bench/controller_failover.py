"""Controller failover, node restart and broker fencing times of a 3-node cluster.

Starts three nodes on 127.0.0.1 (free ports, temporary data directories), each a broker and
a controller voter (the processes are run by `LocalBrokers` of bench/cluster_throughput.py,
which stops every one by PID when the run ends, on errors too). Then:

1. Controller failover, `--rounds` (5) times: find the active controller
   (`Admin.describe_cluster().controller_id`), SIGKILL it, and create a topic through the
   two surviving brokers until it succeeds: a fresh client per attempt, each attempt bounded
   by ATTEMPT_TIMEOUT_S, ATTEMPT_PAUSE_S between attempts, FAILOVER_TIMEOUT_S in all. The
   surviving broker holds a forwarded request and retries it until it reaches an active
   controller (ControllerChannel), so the attempt started right after the kill usually is
   the one that succeeds, and a long attempt timeout keeps the figure from being rounded up
   to whole timeouts. The time is from the kill to the successful answer. It includes
   noticing the silence (a Raft follower campaigns after 10-20 ticks of 100 ms without a
   leader), the election, the new controller's first commit, and the surviving broker's
   forwarding finding the new controller. Then the killed node is restarted on its data
   directory and the round waits until it serves and the survivors' describe_cluster shows
   it unfenced.
2. Node restart to serving: from spawning the process of a SIGKILLed node until its
   `broker_started` line (it serves once its own metadata image shows it registered and
   unfenced). Every restart of this run is a sample; the first start of the three nodes
   (an empty data directory, a new cluster) is printed apart.
3. Broker fencing after SIGKILL of a broker that is not the active controller, `--fencing-
   rounds` (2) times: from the kill until a surviving broker's describe_cluster shows it
   fenced (sampled every POLL_S), with the default 6 s broker session (heartbeat 1 s), then
   on a new cluster started with `--config` naming `broker_session_timeout_ms = 2000` and
   `broker_heartbeat_interval_ms = 200`. The session runs from the last heartbeat the
   controller received, up to one heartbeat interval before the kill.

Prints each sample as it is taken, then min/median/max per figure. Nothing is asserted about
time. On this 2-core machine three broker processes and the client share 2 cores.

Usage: python bench/controller_failover.py [--rounds 5] [--fencing-rounds 2]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.cluster_throughput import LocalBrokers, open_brokers  # noqa: E402
from client import Admin, ClusterDescription, ConnectionFailed  # noqa: E402
from protocol import DwalError, ErrorCode  # noqa: E402

NODE_IDS = (1, 2, 3)
ATTEMPT_TIMEOUT_S = 10.0  # one topic creation attempt, its admin retries included
ATTEMPT_PAUSE_S = 0.02  # between failed attempts
FAILOVER_TIMEOUT_S = 60.0  # from the kill until a topic creation succeeded
DESCRIBE_TIMEOUT_S = 2.0  # one describe_cluster sample
POLL_S = 0.02  # describe_cluster sampling
WAIT_TIMEOUT_S = 60.0  # for a controller to be known, a broker to be (un)fenced
SHORT_SESSION_TOML = "broker_session_timeout_ms = 2000\nbroker_heartbeat_interval_ms = 200\n"


async def describe_cluster(bootstrap: str) -> ClusterDescription:
    """The cluster as the first answering broker of `bootstrap` sees it (a fresh client)."""
    with trio.fail_after(DESCRIBE_TIMEOUT_S):
        async with client.connect(bootstrap, request_timeout_ms=1000) as cluster:
            return await Admin(cluster, timeout_ms=1000).describe_cluster()


async def wait_description(bootstrap: str, condition, what: str) -> ClusterDescription:
    """Sample describe_cluster every POLL_S until `condition(description)`; returns that
    description. Failed samples are retried; raises RuntimeError naming `what` after
    WAIT_TIMEOUT_S."""
    last: ClusterDescription | Exception | None = None
    with trio.move_on_after(WAIT_TIMEOUT_S):
        while True:
            try:
                last = await describe_cluster(bootstrap)
                if condition(last):
                    return last
            except (DwalError, ConnectionFailed, trio.TooSlowError) as error:
                last = error
            await trio.sleep(POLL_S)
    raise RuntimeError(f"no {what} within {WAIT_TIMEOUT_S} s via {bootstrap}; last: {last!r}")


def broker_fenced(description: ClusterDescription, node_id: int) -> bool | None:
    """Whether the broker is fenced in `description`; None when it is not registered."""
    for broker in description.brokers:
        if broker.node_id == node_id:
            return broker.fenced
    return None


async def wait_unfenced(brokers: LocalBrokers, node_id: int) -> None:
    """Wait until every other node's describe_cluster shows `node_id` unfenced."""
    for other in NODE_IDS:
        if other != node_id:
            await wait_description(
                brokers.bootstrap([other]),
                lambda description: broker_fenced(description, node_id) is False,
                f"node {node_id} unfenced",
            )


async def create_topic_until_success(
    bootstrap: str, topic: str, killed_at: float, errors: Counter
) -> float:
    """Create `topic` through `bootstrap` until an attempt succeeds; returns the seconds
    from `killed_at`. An answer TOPIC_ALREADY_EXISTS (an earlier attempt was applied but
    its answer was lost) counts as success. Raises TooSlowError after FAILOVER_TIMEOUT_S."""
    with trio.fail_after(FAILOVER_TIMEOUT_S):
        while True:
            try:
                with trio.fail_after(ATTEMPT_TIMEOUT_S):
                    async with client.connect(
                        bootstrap, request_timeout_ms=int(ATTEMPT_TIMEOUT_S * 1000)
                    ) as cluster:
                        admin = Admin(
                            cluster,
                            retry_backoff_ms=20,
                            retry_backoff_max_ms=100,
                            timeout_ms=int(ATTEMPT_TIMEOUT_S * 1000),
                        )
                        await admin.create_topic(topic)
                return time.perf_counter() - killed_at
            except DwalError as error:
                if error.code == ErrorCode.TOPIC_ALREADY_EXISTS:
                    errors["TOPIC_ALREADY_EXISTS (counted as success)"] += 1
                    return time.perf_counter() - killed_at
                errors[error.code.name] += 1
            except ConnectionFailed:
                errors["ConnectionFailed"] += 1
            except trio.TooSlowError:
                errors["attempt timed out"] += 1
            await trio.sleep(ATTEMPT_PAUSE_S)


async def controller_failover_round(
    brokers: LocalBrokers, number: int, restarts: list[float]
) -> float:
    """Kill the active controller, time the next topic creation, restart the node."""
    description = await wait_description(
        brokers.bootstrap(), lambda d: d.controller_id in NODE_IDS, "a controller"
    )
    controller = description.controller_id
    survivors = [node_id for node_id in NODE_IDS if node_id != controller]
    errors: Counter = Counter()
    killed_at = await brokers.kill(controller)
    seconds = await create_topic_until_success(
        brokers.bootstrap(survivors), f"failover-{number}", killed_at, errors
    )
    after = await wait_description(
        brokers.bootstrap(survivors), lambda d: d.controller_id in survivors, "a new controller"
    )
    restart_seconds = await brokers.restart(controller)
    restarts.append(restart_seconds)
    await wait_unfenced(brokers, controller)
    failed = ", ".join(f"{name} x{count}" for name, count in sorted(errors.items())) or "none"
    print(
        f"failover round={number} killed_controller={controller} "
        f"new_controller={after.controller_id} kill_to_topic_created_ms={seconds * 1000:.0f} "
        f"failed_attempts: {failed}; restart_to_serving_ms={restart_seconds * 1000:.0f}",
        flush=True,
    )
    return seconds


async def fencing_round(
    brokers: LocalBrokers, label: str, number: int, restarts: list[float]
) -> float:
    """Kill a broker that is not the active controller, time until it shows fenced on a
    surviving broker, restart it."""
    description = await wait_description(
        brokers.bootstrap(), lambda d: d.controller_id in NODE_IDS, "a controller"
    )
    victim = max(node_id for node_id in NODE_IDS if node_id != description.controller_id)
    observer = description.controller_id  # a survivor; its image follows the controller's
    killed_at = await brokers.kill(victim)
    await wait_description(
        brokers.bootstrap([observer]),
        lambda d: broker_fenced(d, victim) is True,
        f"node {victim} fenced",
    )
    seconds = time.perf_counter() - killed_at
    restart_seconds = await brokers.restart(victim)
    restarts.append(restart_seconds)
    await wait_unfenced(brokers, victim)
    print(
        f"fencing {label} round={number} killed_broker={victim} observer={observer} "
        f"kill_to_fenced_ms={seconds * 1000:.0f} "
        f"restart_to_serving_ms={restart_seconds * 1000:.0f}",
        flush=True,
    )
    return seconds


def summary(label: str, seconds: Sequence[float]) -> str:
    milliseconds = [value * 1000 for value in seconds]
    if not milliseconds:
        return f"{label}: n=0"
    return (
        f"{label}: n={len(milliseconds)} min_ms={min(milliseconds):.0f} "
        f"median_ms={statistics.median(milliseconds):.0f} max_ms={max(milliseconds):.0f}"
    )


async def start_cluster(brokers: LocalBrokers, label: str) -> None:
    started = await brokers.start_all()
    for node_id in NODE_IDS:
        await wait_unfenced(brokers, node_id)
    print(
        f"first start {label}: "
        + " ".join(f"node{node_id}_ms={seconds * 1000:.0f}" for node_id, seconds in started.items())
        + " (spawn to broker_started, all spawned together)",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="controller failover rounds")
    parser.add_argument("--fencing-rounds", type=int, default=2, help="per session timeout")
    arguments = parser.parse_args()
    failovers: list[float] = []
    restarts: list[float] = []
    fencing: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dwal-controller-failover-") as temporary:
        root = pathlib.Path(temporary)
        label = "session_6000ms_heartbeat_1000ms"
        async with open_brokers(root / "default", NODE_IDS, cluster=True) as brokers:
            await start_cluster(brokers, label)
            for number in range(1, arguments.rounds + 1):
                failovers.append(await controller_failover_round(brokers, number, restarts))
            fencing[label] = [
                await fencing_round(brokers, label, number, restarts)
                for number in range(1, arguments.fencing_rounds + 1)
            ]
        config = root / "short-session.toml"
        config.write_text(SHORT_SESSION_TOML)
        label = "session_2000ms_heartbeat_200ms"
        options = ["--config", str(config)]
        async with open_brokers(root / "short", NODE_IDS, cluster=True, options=options) as brokers:
            await start_cluster(brokers, label)
            fencing[label] = [
                await fencing_round(brokers, label, number, restarts)
                for number in range(1, arguments.fencing_rounds + 1)
            ]
    print()
    print(summary("controller failover, SIGKILL to topic created", failovers))
    print(summary("node restart, spawn to broker_started", restarts))
    for label, samples in fencing.items():
        print(summary(f"broker fencing {label}, SIGKILL to shown fenced", samples))


if __name__ == "__main__":
    trio.run(main)
