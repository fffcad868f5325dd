"""Which cluster and which node a data directory belongs to: `<data_dir>/meta.properties`.

Like Kafka's file of the same name: ``version=1``, ``cluster.id=...``, ``node.id=...``, in
Java properties syntax, written once (atomically) when the node first joins a cluster and
checked at every start, so a node started with another node's or another cluster's data
refuses to start instead of serving it as its own.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from broker.data_dir_lock import DataDirError
from broker.storage.checkpoint import write_atomically

META_PROPERTIES = "meta.properties"
VERSION = 1


@dataclass(frozen=True, slots=True)
class DataDirIdentity:
    cluster_id: str
    node_id: int


def read_identity(data_dir: pathlib.Path) -> DataDirIdentity | None:
    """The identity recorded in `data_dir`, or None when there is none yet. Raises
    DataDirError for a file that cannot be read or does not parse."""
    path = data_dir / META_PROPERTIES
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise DataDirError(f"cannot read {path}: {error}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, separator, value = line.partition("=")
        if not separator:
            raise DataDirError(f"{path}: not a property line: {line[:80]!r}")
        values[key.strip()] = value.strip()
    try:
        version = int(values["version"])
        cluster_id = values["cluster.id"]
        node_id = int(values["node.id"])
    except (KeyError, ValueError) as error:
        raise DataDirError(f"{path}: missing or invalid property {error}") from None
    if version != VERSION or not cluster_id:
        raise DataDirError(f"{path}: unsupported version {version} or empty cluster.id")
    return DataDirIdentity(cluster_id=cluster_id, node_id=node_id)


def write_identity(data_dir: pathlib.Path, identity: DataDirIdentity) -> None:
    """Record the identity durably (blocking)."""
    text = (
        "# written by DWAL when this node joined its cluster; do not edit\n"
        f"version={VERSION}\ncluster.id={identity.cluster_id}\nnode.id={identity.node_id}\n"
    )
    write_atomically(data_dir / META_PROPERTIES, text.encode())


def check_node_id(data_dir: pathlib.Path, identity: DataDirIdentity | None, node_id: int) -> None:
    """Raise DataDirError when the data directory belongs to another node."""
    if identity is not None and identity.node_id != node_id:
        raise DataDirError(
            f"data directory {data_dir} belongs to node {identity.node_id} of cluster "
            f"{identity.cluster_id}, not to node {node_id}: start it with --node-id "
            f"{identity.node_id} or give this node its own --data-dir"
        )


def check_cluster_id(
    data_dir: pathlib.Path, identity: DataDirIdentity | None, cluster_id: str
) -> None:
    """Raise DataDirError when the data directory belongs to another cluster."""
    if identity is not None and identity.cluster_id != cluster_id:
        raise DataDirError(
            f"data directory {data_dir} belongs to cluster {identity.cluster_id}, but the "
            f"controller quorum is cluster {cluster_id}: this node's data is another "
            "cluster's; give it an empty --data-dir to join this one"
        )
