"""meta.properties: which cluster and node a data directory belongs to."""

from __future__ import annotations

import pytest

from broker.data_dir_identity import (
    META_PROPERTIES,
    DataDirIdentity,
    check_cluster_id,
    check_node_id,
    read_identity,
    write_identity,
)
from broker.data_dir_lock import DataDirError


def test_an_identity_reads_back_as_written(tmp_path):
    identity = DataDirIdentity(cluster_id="q1w2e3r4", node_id=3)
    write_identity(tmp_path, identity)
    assert read_identity(tmp_path) == identity
    text = (tmp_path / META_PROPERTIES).read_text()
    assert "version=1\n" in text and "cluster.id=q1w2e3r4\n" in text and "node.id=3\n" in text
    assert [p.name for p in tmp_path.iterdir()] == [META_PROPERTIES], "no temporary file left"


def test_a_directory_without_the_file_has_no_identity(tmp_path):
    assert read_identity(tmp_path) is None
    check_node_id(tmp_path, None, 1)
    check_cluster_id(tmp_path, None, "any")


def test_java_properties_comments_and_spaces_are_accepted(tmp_path):
    (tmp_path / META_PROPERTIES).write_text(
        "# comment\n! another\n\n  version = 1\ncluster.id= abc \nnode.id =7\n"
    )
    assert read_identity(tmp_path) == DataDirIdentity(cluster_id="abc", node_id=7)


@pytest.mark.parametrize(
    "text",
    [
        "version=1\ncluster.id=abc\n",  # no node.id
        "version=1\ncluster.id=abc\nnode.id=seven\n",
        "version=2\ncluster.id=abc\nnode.id=1\n",
        "version=1\ncluster.id=\nnode.id=1\n",
        "version=1\ncluster.id=abc\nnode.id=1\nnot a property line\n",
    ],
    ids=["missing-key", "bad-node-id", "other-version", "empty-cluster-id", "no-separator"],
)
def test_a_malformed_file_is_a_data_dir_error(tmp_path, text):
    (tmp_path / META_PROPERTIES).write_text(text)
    with pytest.raises(DataDirError) as caught:
        read_identity(tmp_path)
    assert META_PROPERTIES in str(caught.value)


def test_an_unreadable_file_is_a_data_dir_error(tmp_path):
    (tmp_path / META_PROPERTIES).write_bytes(b"version=1\ncluster.id=\xff\xfe\nnode.id=1\n")
    with pytest.raises(DataDirError, match="cannot read"):
        read_identity(tmp_path)


def test_another_nodes_data_dir_is_refused_with_what_to_do(tmp_path):
    identity = DataDirIdentity(cluster_id="c1", node_id=2)
    check_node_id(tmp_path, identity, 2)
    with pytest.raises(DataDirError) as caught:
        check_node_id(tmp_path, identity, 5)
    message = str(caught.value)
    assert "belongs to node 2 of cluster c1, not to node 5" in message
    assert "--node-id 2" in message and str(tmp_path) in message


def test_another_clusters_data_dir_is_refused_with_what_to_do(tmp_path):
    identity = DataDirIdentity(cluster_id="c1", node_id=2)
    check_cluster_id(tmp_path, identity, "c1")
    with pytest.raises(DataDirError) as caught:
        check_cluster_id(tmp_path, identity, "c2")
    message = str(caught.value)
    assert "belongs to cluster c1" in message and "quorum is cluster c2" in message
    assert "empty --data-dir" in message
