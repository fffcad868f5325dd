"""A cluster node refuses to start on a data directory that is not its own: another node's,
another cluster's, or a voter's whose metadata log (``__cluster_metadata/``) vanished while
its ``meta.properties`` stayed. Each refusal is exit status 1 and exactly one ``error:``
line naming the problem, and the rest of the cluster keeps serving."""

from __future__ import annotations

import shutil

from cluster_client import create_topic, describe_cluster, leaders_known
from cluster_launcher import ClusterLauncher, NodeProcess, wait_for


def one_error_line(run: NodeProcess) -> str:
    """The refused node's only line of output, which must be an ``error:`` line."""
    lines = run.lines
    assert len(lines) == 1 and lines[0].startswith("error: "), run.text
    return lines[0]


def meta_properties(launcher: ClusterLauncher, node_id: int) -> dict[str, str]:
    text = (launcher.nodes[node_id].data_dir / "meta.properties").read_text()
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line]
    return {key: value for key, value in pairs}


async def still_serving(launcher: ClusterLauncher, node_id: int, cluster_id: str) -> None:
    """Node `node_id` still answers for cluster `cluster_id` and a topic can be created."""
    bootstrap = launcher.nodes[node_id].bootstrap
    assert (await describe_cluster(bootstrap)).cluster_id == cluster_id
    await create_topic(bootstrap, "still-serving", 2)
    await wait_for(lambda: leaders_known(bootstrap, "still-serving"), timeout_s=10, what="leaders")


async def test_a_node_refuses_another_nodes_data_dir(three_nodes):
    cluster_id = meta_properties(three_nodes, 1)["cluster.id"]
    node_1_dir = three_nodes.nodes[1].data_dir
    assert await three_nodes.stop(1) == 0
    assert await three_nodes.stop(2) == 0  # frees node 2's ports for its second start

    refused = await three_nodes.start_refused(2, data_dir=node_1_dir)

    assert refused.returncode == 1
    assert one_error_line(refused).startswith(
        f"error: data directory {node_1_dir} belongs to node 1 of cluster {cluster_id}, "
        "not to node 2"
    )
    assert meta_properties(three_nodes, 1) == {
        "version": "1",
        "cluster.id": cluster_id,
        "node.id": "1",
    }
    await three_nodes.start(1, 2)  # both on their own data dirs again
    await still_serving(three_nodes, 2, cluster_id)


async def test_a_node_refuses_the_data_dir_of_another_cluster(three_nodes, nursery, tmp_path):
    cluster_id = meta_properties(three_nodes, 1)["cluster.id"]
    # Another cluster: a single voter, node 3, with a data dir of its own.
    other = ClusterLauncher(nursery, tmp_path / "other", three_nodes.config_path)
    try:
        other.add_node(3)
        await other.start()
        other_cluster_id = meta_properties(other, 3)["cluster.id"]
        assert other_cluster_id != cluster_id
        assert await other.stop(3) == 0
    finally:
        other.kill_all()
    assert await three_nodes.stop(3) == 0

    refused = await three_nodes.start_refused(3, data_dir=other.nodes[3].data_dir)

    assert refused.returncode == 1
    await still_serving(three_nodes, 1, cluster_id)  # the foreign metadata log did no harm
    error_line = one_error_line(refused)
    for named in (str(other.nodes[3].data_dir), other_cluster_id, cluster_id):
        assert named in error_line, (named, error_line)


async def test_a_voter_whose_metadata_log_vanished_refuses_to_start(three_nodes):
    cluster_id = meta_properties(three_nodes, 3)["cluster.id"]
    data_dir = three_nodes.nodes[3].data_dir
    assert await three_nodes.stop(3) == 0
    shutil.rmtree(data_dir / "__cluster_metadata")

    refused = await three_nodes.start_refused(3)

    assert refused.returncode == 1
    assert one_error_line(refused) == (
        f"error: {data_dir} belongs to node 3 of cluster {cluster_id}, but its metadata log "
        f"({data_dir / '__cluster_metadata'}) is gone: this voter could vote without the "
        "entries it acknowledged. Restore the directory, or remove meta.properties to start "
        "this node as a new, empty member"
    )
    assert not (data_dir / "__cluster_metadata").exists()
    await still_serving(three_nodes, 1, cluster_id)
