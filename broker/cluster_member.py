"""This node's part in the cluster: its member of the metadata quorum, its channel to the
active controller, the metadata publisher and the broker's registration and heartbeats.

Theory of operation. Every node runs a `QuorumController` over the metadata log in
`<data_dir>/__cluster_metadata/`: a voter when it has the controller role, else a learner
(the active controller adds each registered broker that is no voter as a learner, so it
receives the log). Without `--controller-quorum` the node is a cluster of one voter on an
in-memory transport: it campaigns at once and is the active controller within a few fsyncs;
everything else is the same code path as in a cluster. With one, Raft and the brokers'
controller requests share the controller port (`ControllerListener`).

Start-up, in order (`run` reports `started()` at the end, when the broker may serve):
1. check `meta.properties` (another node's data dir refuses to start; so does a voter whose
   metadata log vanished), open the metadata log, start the quorum member;
2. wait for the image to know the cluster id (the first active controller writes it), check
   it against `meta.properties` (another cluster's data refuses), record it on first start;
3. start the publisher: the logs of every partition the image places here are opened;
4. register (new incarnation), catch up to the registration, get unfenced by heartbeats;
5. single node only: adopt the topics of a pre-quorum data dir (`topics.json`).

At stop (cluster only), while the broker still serves (`stop_gracefully`, on SIGTERM):
1. if this node is the active controller, it hands the Raft leadership of the metadata
   quorum to another voter (TimeoutNow: an election without waiting for a timeout), so the
   quorum has an active controller again within a round trip instead of an election
   timeout after this node is gone;
2. it asks the active controller for a controlled shutdown (`BrokerLifecycle.shut_down`):
   its partitions get other leaders at once rather than after its session times out;
3. it waits until its published image shows it leads nothing (so produce requests still
   arriving are answered NOT_LEADER_OR_FOLLOWER, which clients retry at the new leader,
   rather than cut off with the connection).
Only then does the broker stop serving. A stop without `stop_gracefully` (cancellation)
still makes the controlled shutdown request, after everything else stopped.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable

import trio

from broker.broker_lifecycle import CONTROLLER_LISTENER, BrokerLifecycle, ListenerAddress
from broker.config import BrokerConfig
from broker.controller.controller_apis import ControllerApis
from broker.controller.controller_channel import ControllerChannel
from broker.controller.controller_listener import ControllerListener, ControllerRequestHandlers
from broker.controller.metadata_image import MetadataImage
from broker.controller.quorum_controller import (
    METADATA_DIRECTORY_NAME,
    QuorumController,
    QuorumControllerConfig,
    open_metadata_storage,
)
from broker.data_dir_identity import (
    DataDirIdentity,
    check_cluster_id,
    check_node_id,
    read_identity,
    write_identity,
)
from broker.data_dir_lock import DataDirError
from broker.event_log import log_event
from broker.metadata_publisher import ImageListener, MetadataPublisher
from broker.raft.config import RaftConfig
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import ConfigChange, ConfigChangeKind
from broker.raft.node import RaftError
from broker.raft.tcp_transport import TcpTransport, TcpTransportConfig
from broker.server import NativeServer
from broker.topic_registry import (
    LEGACY_TOPICS_FILE,
    TopicMetadata,
    TopicRegistry,
    read_legacy_topics,
)
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey

logger = logging.getLogger("dwal.broker")


class ClusterMember:
    def __init__(
        self,
        config: BrokerConfig,
        registry: TopicRegistry,
        *,
        advertised: list[ListenerAddress],
        image_listeners: Iterable[ImageListener] = (),
    ) -> None:
        """`advertised`: the listeners this broker registers (the native one first);
        `image_listeners` run, in order, after the registry's for each published image."""
        self.config = config
        self.registry = registry
        self.advertised = advertised
        self.node_id = config.node_id
        self.voters = config.quorum_voters()
        self.embedded = not self.voters
        self._image_listeners = list(image_listeners)
        self.controller: QuorumController | None = None
        self.channel: ControllerChannel | None = None
        self.publisher: MetadataPublisher | None = None
        self.lifecycle: BrokerLifecycle | None = None
        self.transport: TcpTransport | None = None
        self._legacy_topics: dict[str, TopicMetadata] | None = None
        self._shut_down = False  # the controlled shutdown was accepted

    def add_image_listener(self, listener: ImageListener) -> None:
        """Run `listener` for each published image (after the registry's); before `run`."""
        self._image_listeners.append(listener)

    @property
    def image(self) -> MetadataImage:
        """The published image: what request handlers read."""
        assert self.publisher is not None, "the cluster member is not running"
        return self.publisher.image

    async def wait_published(self, index: int) -> MetadataImage:
        assert self.publisher is not None, "the cluster member is not running"
        return await self.publisher.wait_published(index)

    async def ask_controller(self, api_key: ApiKey, body: dict) -> dict:
        """Have the active controller answer a read; return its answer. Raises DwalError."""
        assert self.channel is not None, "the cluster member is not running"
        timeout_seconds = self.config.limits.controller_request_timeout_ms / 1000
        return await self.channel.call(api_key, body, timeout_seconds=timeout_seconds)

    async def call_controller(self, api_key: ApiKey, body: dict) -> dict:
        """Have the active controller answer; return once this node's published image
        includes the change it made. Raises DwalError."""
        assert self.channel is not None, "the cluster member is not running"
        timeout_seconds = self.config.limits.controller_request_timeout_ms / 1000
        reply = await self.channel.call(api_key, body, timeout_seconds=timeout_seconds)
        offset = reply.get("metadata_offset", -1)
        if offset > 0:
            with trio.move_on_after(timeout_seconds) as scope:
                await self.wait_published(offset)
            if scope.cancelled_caught:
                raise DwalError(
                    ErrorCode.REQUEST_TIMED_OUT,
                    f"the change is committed (metadata offset {offset}) but this broker has "
                    "not applied it yet",
                )
        return reply

    # -- running ----------------------------------------------------------------------------

    async def run(
        self,
        controller_listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled; `started()` once the broker is registered, unfenced and
        its logs are open. Raises DataDirError (see the module docstring), and what the
        metadata log's storage raises."""
        config = self.config
        data_dir = config.data_dir
        identity = await trio.to_thread.run_sync(read_identity, data_dir)
        check_node_id(data_dir, identity, self.node_id)
        metadata_dir = data_dir / METADATA_DIRECTORY_NAME
        if identity is not None and config.is_controller and not metadata_dir.exists():
            raise DataDirError(
                f"{data_dir} belongs to node {identity.node_id} of cluster "
                f"{identity.cluster_id}, but its metadata log ({metadata_dir}) is gone: this "
                "voter could vote without the entries it acknowledged. Restore the directory, "
                "or remove meta.properties to start this node as a new, empty member"
            )
        # Read first: a damaged file refuses the start before anything is written.
        self._legacy_topics = await trio.to_thread.run_sync(read_legacy_topics, data_dir)
        if self._legacy_topics is not None and not self.embedded:
            raise DataDirError(
                f"{data_dir} holds the topics of a single node ({LEGACY_TOPICS_FILE}); start "
                "it once without --controller-quorum to adopt them, or give this cluster "
                "member an empty --data-dir"
            )
        voter_ids = {self.node_id} if self.embedded else set(self.voters)
        storage = await trio.to_thread.run_sync(open_metadata_storage, data_dir, voter_ids)
        try:
            await self._run_with_storage(storage, identity, controller_listeners, task_status)
        finally:
            storage.close()

    async def _run_with_storage(self, storage, identity, controller_listeners, task_status) -> None:
        config = self.config
        transport: object
        if self.embedded:
            transport = MemoryNetwork(random.Random()).endpoint(self.node_id)
        else:
            self.transport = TcpTransport(
                TcpTransportConfig(
                    node_id=self.node_id,
                    peers={i: address for i, address in self.voters.items() if i != self.node_id},
                    listen=False,
                )
            )
            transport = self.transport
        controller = QuorumController(
            RaftConfig(node_id=self.node_id),
            storage,
            transport,  # type: ignore[arg-type]
            config=QuorumControllerConfig(
                session_timeout_seconds=config.broker_session_timeout_ms / 1000,
                heartbeat_interval_seconds=config.broker_heartbeat_interval_ms / 1000,
                auto_leader_rebalance_enable=config.auto_leader_rebalance_enable,
                leader_imbalance_check_interval_seconds=(
                    config.leader_imbalance_check_interval_ms / 1000
                ),
                leader_imbalance_per_broker_percentage=(
                    config.leader_imbalance_per_broker_percentage
                ),
            ),
        )
        self.controller = controller
        apis = None
        if config.is_controller:
            apis = ControllerApis(
                controller,
                log_defaults=config.log_defaults,
                limits=config.limits,
                default_replication_factor=config.default_replication_factor,
            )
        self.channel = ControllerChannel(
            self.node_id,
            controller,
            apis,
            voters=self.voters,
            response_bytes_max=config.limits.controller_response_bytes_max,
        )
        self.publisher = MetadataPublisher(
            controller,
            [self._apply_to_registry, self._follow_learner_addresses, *self._image_listeners],
        )
        self.lifecycle = BrokerLifecycle(
            self.node_id,
            self.channel,
            cluster_id=lambda: (
                identity.cluster_id if identity is not None else controller.image.cluster_id or ""
            ),
            listeners=self._registered_listeners(controller_listeners),
            rack=config.rack,
            metadata_offset=lambda: self.image.last_applied_index,
            wait_metadata_offset=self.wait_published,
            heartbeat_interval_seconds=config.broker_heartbeat_interval_ms / 1000,
            request_timeout_seconds=max(config.broker_session_timeout_ms / 1000, 5.0),
        )
        try:
            await self._run_tasks(controller, apis, identity, controller_listeners, task_status)
        finally:
            if not self.embedded and self.lifecycle.broker_epoch >= 0 and not self._shut_down:
                await self.lifecycle.shut_down(
                    self.config.limits.controlled_shutdown_timeout_ms / 1000
                )
            with trio.CancelScope(shield=True):
                await self.channel.aclose()

    async def _run_tasks(self, controller, apis, identity, controller_listeners, task_status):
        config = self.config
        assert self.lifecycle is not None and self.publisher is not None
        first_frame_timeout = config.limits.controller_first_frame_timeout_ms / 1000
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            if not self.embedded:
                assert apis is not None or not config.is_controller
                if apis is not None and self.transport is not None:
                    rpc_server = NativeServer(ControllerRequestHandlers(config, apis))  # type: ignore[arg-type]
                    listener = ControllerListener(
                        self.transport,
                        rpc_server,
                        first_frame_timeout_seconds=first_frame_timeout,
                    )
                    await nursery.start(listener.serve, controller_listeners)
                    nursery.start_soon(self._keep_brokers_as_learners)
                elif self.transport is not None:
                    listener = ControllerListener(
                        self.transport,
                        _no_rpc_server(config),
                        first_frame_timeout_seconds=first_frame_timeout,
                    )
                    await nursery.start(listener.serve, controller_listeners)
            else:
                controller.driver.campaign()  # the only voter: no need to wait for a timeout
            # Register first: a learner receives the log only once it is registered.
            try:
                await self.lifecycle.register()
            except DwalError as error:
                if error.code != ErrorCode.INCONSISTENT_CLUSTER_ID or identity is None:
                    raise
                raise DataDirError(
                    f"data directory {config.data_dir} belongs to cluster "
                    f"{identity.cluster_id}, not to the cluster of --controller-quorum "
                    f"({error.message}); give this node an empty --data-dir to join it"
                ) from None
            cluster_id = await self._wait_cluster_id()
            check_cluster_id(config.data_dir, identity, cluster_id)
            if identity is None:
                await trio.to_thread.run_sync(
                    write_identity, config.data_dir, DataDirIdentity(cluster_id, self.node_id)
                )
            await nursery.start(self.publisher.run)
            epoch = await nursery.start(self.lifecycle.run)
            await self._wait_unfenced_locally(epoch)
            if self.embedded:
                await self._adopt_legacy_topics()
            await trio.to_thread.run_sync(self.registry.report_loaded)
            log_event(
                logger,
                logging.INFO,
                "cluster_joined",
                node_id=self.node_id,
                cluster_id=cluster_id,
                broker_epoch=epoch,
                voters=",".join(map(str, sorted(self.voters or [self.node_id]))),
            )
            task_status.started()

    async def stop_gracefully(self, timeout_seconds: float) -> None:
        """Leave the cluster while still serving (see the module's theory and
        `leave_cluster`). Best effort within `timeout_seconds`."""
        lifecycle, controller, publisher = self.lifecycle, self.controller, self.publisher
        if self.embedded or lifecycle is None or controller is None or publisher is None:
            return
        self._shut_down = await leave_cluster(
            self.node_id,
            sorted(self.voters),
            controller,
            lifecycle,
            publisher,
            timeout_seconds=timeout_seconds,
        )

    def _registered_listeners(
        self, controller_listeners: list[trio.SocketListener]
    ) -> list[ListenerAddress]:
        listeners = list(self.advertised)
        if controller_listeners and not self.config.is_controller:
            # a learner: the active controller sends it the log on this port
            port = controller_listeners[0].socket.getsockname()[1]
            host = self.advertised[0].host
            listeners.append(ListenerAddress(CONTROLLER_LISTENER, host, port))
        return listeners

    async def _wait_unfenced_locally(self, epoch: int) -> None:
        """Wait until the published image shows this broker unfenced (the entry that
        unfenced it also gave it back the leadership of its leaderless partitions)."""
        while True:
            broker = self.image.brokers.get(self.node_id)
            if broker is not None and (broker.epoch != epoch or not broker.fenced):
                return
            await self.wait_published(self.image.last_applied_index + 1)

    async def _wait_cluster_id(self) -> str:
        assert self.controller is not None
        while True:
            image = self.controller.image
            if image.cluster_id is not None:
                return image.cluster_id
            await self.controller.wait_image_at_least(image.last_applied_index + 1)

    async def _apply_to_registry(self, previous: MetadataImage, image: MetadataImage) -> None:
        await self.registry.apply_image(image, self.node_id)

    async def _follow_learner_addresses(
        self, previous: MetadataImage, image: MetadataImage
    ) -> None:
        """Keep the transport's peers in line with the learners' registered controller
        ports (voters' come from --controller-quorum)."""
        await trio.lowlevel.checkpoint()
        if self.transport is None or image.brokers is previous.brokers:
            return
        for broker_id, broker in image.brokers.items():
            if broker_id == self.node_id or broker_id in self.voters:
                continue
            address = next(
                (
                    (item.host, item.port)
                    for item in broker.listeners
                    if item.name == CONTROLLER_LISTENER
                ),
                None,
            )
            old = previous.brokers.get(broker_id)
            old_address = None
            if old is not None:
                old_address = next(
                    (
                        (item.host, item.port)
                        for item in old.listeners
                        if item.name == CONTROLLER_LISTENER
                    ),
                    None,
                )
            if address is not None and (address != old_address or old is None):
                self.transport.set_peer(broker_id, *address)

    async def _keep_brokers_as_learners(self) -> None:
        """While this node is the active controller, make every registered broker that is
        no voter a learner of the metadata quorum (so it receives the log)."""
        assert self.controller is not None
        controller = self.controller
        while True:
            await controller.wait_active()
            image = controller.image
            configuration = controller.driver.node.configuration
            missing = [
                broker_id
                for broker_id in sorted(image.brokers)
                if broker_id not in configuration.voters and broker_id not in configuration.learners
            ]
            for broker_id in missing:
                try:
                    await controller.driver.propose_config_change(
                        ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=broker_id)
                    )
                    log_event(logger, logging.INFO, "metadata_learner_added", node_id=broker_id)
                except (RaftError, DwalError) as error:
                    log_event(
                        logger,
                        logging.WARNING,
                        "metadata_learner_add_failed",
                        node_id=broker_id,
                        error=str(error),
                    )
                    await trio.sleep(0.2)
            if not missing:
                await controller.wait_image_at_least(image.last_applied_index + 1)

    async def _adopt_legacy_topics(self) -> None:
        """Create, with this node as their only replica, the topics a pre-quorum data dir
        listed in topics.json; their partition directories are then opened as they are.
        topics.json is renamed once every topic is in the metadata log."""
        data_dir = self.config.data_dir
        legacy = self._legacy_topics
        if legacy is None:
            return
        adopted = 0
        for topic in legacy.values():
            if topic.name in self.image.topics:
                continue
            body = {
                "topics": [
                    {
                        "topic": topic.name,
                        "partitions": topic.partitions,
                        "replication_factor": 1,
                        "configs": topic.configs,
                    }
                ],
                "validate_only": False,
            }
            reply = await self.call_controller(ApiKey.CREATE_TOPICS, body)
            result = reply["topics"][0]
            if result["error_code"] and result["error_code"] != ErrorCode.TOPIC_ALREADY_EXISTS:
                raise DataDirError(
                    f"cannot adopt topic {topic.name!r} of {data_dir / LEGACY_TOPICS_FILE}: "
                    f"{result.get('error_message')}"
                )
            adopted += 1
        await trio.to_thread.run_sync(
            os.replace, data_dir / LEGACY_TOPICS_FILE, data_dir / (LEGACY_TOPICS_FILE + ".adopted")
        )
        log_event(logger, logging.INFO, "legacy_topics_adopted", topics=adopted)


async def leave_cluster(
    node_id: int,
    voters: list[int],
    controller: QuorumController,
    lifecycle: BrokerLifecycle,
    publisher: MetadataPublisher,
    *,
    timeout_seconds: float,
) -> bool:
    """A broker's graceful leave, while it still serves: hand the metadata quorum's
    leadership to another voter if this node has it, ask for the controlled shutdown, and
    wait until the published image shows this broker leads nothing. Returns whether the
    controlled shutdown was accepted. Best effort within `timeout_seconds`. (A function,
    not a method, so that the cluster simulation leaves the same way.)"""
    if lifecycle.broker_epoch < 0:
        return False
    accepted = False
    with trio.move_on_after(timeout_seconds) as scope:
        await _hand_over_controller(node_id, voters, controller)
        remaining = max(scope.deadline - trio.current_time(), 0.1)
        if not await lifecycle.shut_down(remaining):
            return False
        accepted = True
        while any(
            state.leader == node_id
            for info in publisher.image.topics.values()
            for state in info.partitions
        ):
            await publisher.wait_published(publisher.image.last_applied_index + 1)
        log_event(logger, logging.INFO, "broker_leadership_moved", node_id=node_id)
    return accepted


async def _hand_over_controller(
    node_id: int, voters: list[int], controller: QuorumController
) -> None:
    """If this node leads the metadata quorum, transfer that to another voter (each in
    turn, one election timeout each) and wait until another leader is known."""
    driver = controller.driver
    for target in [v for v in voters if v != node_id]:
        if driver.leadership().leader != node_id:
            return
        try:
            driver.transfer_leadership(target)
        except RaftError:  # no longer the leader, or the voters changed
            return
        with trio.move_on_after(controller.election_timeout_seconds()):
            while driver.leadership().leader in (node_id, 0):
                await driver.wait_leadership_change(driver.leadership())
        if driver.leadership().leader not in (node_id, 0):
            log_event(
                logger,
                logging.INFO,
                "controller_handed_over",
                node_id=node_id,
                to=driver.leadership().leader,
            )
            return


def _no_rpc_server(config: BrokerConfig) -> NativeServer:
    """A learner's controller port answers no controller request."""

    class _Refuse:
        def __init__(self) -> None:
            self.config = config

        async def start(self, api_key, body, tail, context):
            raise DwalError(
                ErrorCode.NOT_CONTROLLER, "this node is a broker only; ask a controller voter"
            )

    return NativeServer(_Refuse())  # type: ignore[arg-type]
