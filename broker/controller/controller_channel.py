"""How a broker reaches the active controller: in process when it is this node, else over
the native protocol to that node's controller port (Kafka's broker-to-controller channel
and request forwarding, KIP-590).

Every node follows the metadata quorum, so it knows the Raft leader (the active controller
or the node about to become it) from its own driver, and every voter's controller port from
`--controller-quorum`; a node that knows no leader (a learner not yet registered, so not yet
sent the log) tries the voters in turn. `call` retries, until its deadline, what says "not
here, not yet": NOT_CONTROLLER, no known or reachable controller. Anything else (a
refusal, a timeout whose outcome is unknown) goes back to the caller as is.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import trio

from broker.controller.controller_apis import ControllerApis
from broker.controller.quorum_controller import NotControllerError, QuorumController
from broker.raft.driver import DriverStoppedError
from broker.raft.messages import NO_NODE
from protocol import DwalError, ErrorCode, ProtocolError
from protocol.api import ApiKey, check_response
from protocol.frame import FrameDecoder, Request, Response, encode_request, parse_response

logger = logging.getLogger("dwal.controller")

IDLE_CONNECTIONS_MAX = 2  # per controller address, kept open between calls
RETRY_DELAY_SECONDS_MIN = 0.02
ATTEMPT_SECONDS_MIN = 0.2  # the least time one request to the controller is given
RETRY_DELAY_SECONDS_MAX = 0.5


class ControllerChannel:
    """Sends controller requests from this node to the active controller."""

    def __init__(
        self,
        node_id: int,
        controller: QuorumController,
        apis: ControllerApis | None,
        *,
        voters: dict[int, tuple[str, int]],
        connect_timeout_seconds: float = 2.0,
        response_bytes_max: int = 16 * 1024 * 1024,
    ) -> None:
        """`apis` answers in process when this node is the active controller (None for a
        node that is no voter); `voters` gives the other voters' controller ports."""
        self.node_id = node_id
        self.controller = controller
        self.apis = apis
        self.voters = voters
        self.connect_timeout_seconds = connect_timeout_seconds
        self.response_bytes_max = response_bytes_max  # see Limits.controller_response_bytes_max
        self._correlation = itertools.count(1)
        self._idle: dict[tuple[str, int], list[trio.SocketStream]] = {}
        self._closed = False
        self.forwarded = 0  # requests sent to another node

    def controller_hint(self) -> int | None:
        leader = self.controller.driver.leadership().leader
        return None if leader == NO_NODE else leader

    async def call(
        self, api_key: ApiKey, body: dict[str, Any], *, timeout_seconds: float
    ) -> dict[str, Any]:
        """Have the active controller answer the request; return its reply body. Raises
        DwalError: the controller's refusal, or NOT_CONTROLLER once `timeout_seconds` passed
        without reaching one. Safe to cancel (the outcome is then unknown)."""
        deadline = trio.current_time() + timeout_seconds
        delay = RETRY_DELAY_SECONDS_MIN
        last_problem = "no active controller is known"
        stopped = self.controller.stopped  # this node's member is gone (its broker stops)
        others = sorted(v for v in self.voters if not (stopped and v == self.node_id))
        rotation = itertools.cycle(others or [self.node_id])
        while True:
            # The known leader; a node that knows none (a learner before the log reaches it,
            # a stopping node) tries the voters in turn: the active one answers, the others
            # NOT_CONTROLLER.
            leader = self.controller_hint()
            if stopped and leader == self.node_id:
                leader = None
            if leader is None and self.voters:
                leader = next(rotation)
            try:
                if leader == self.node_id and self.apis is not None:
                    return await self.apis.handle(api_key, body)
                if leader is not None:
                    # An attempt started gets its answer's time even past the deadline (by
                    # at most ATTEMPT_SECONDS_MIN): cutting it would turn a quick "not me"
                    # into an "outcome unknown" only because the caller's time ran out.
                    remaining = deadline - trio.current_time()
                    with trio.fail_after(max(remaining, ATTEMPT_SECONDS_MIN)):
                        return await self._send(leader, api_key, body)
            except NotControllerError as error:
                last_problem = error.message
            except DwalError as error:
                if error.code != ErrorCode.NOT_CONTROLLER:
                    raise
                last_problem = error.message
            except (OSError, trio.BrokenResourceError, ProtocolError, _Unreachable) as error:
                last_problem = f"controller {leader} unreachable: {error}"
            except trio.TooSlowError:
                raise DwalError(
                    ErrorCode.REQUEST_TIMED_OUT,
                    f"no answer from controller {leader} in time; the outcome is unknown",
                ) from None
            now = trio.current_time()
            if now >= deadline:
                raise DwalError(ErrorCode.NOT_CONTROLLER, last_problem)
            # A leadership change (or a short delay: the leader may not have registered its
            # listeners yet, or be reading through its log) is worth another try.
            with trio.move_on_at(min(deadline, now + delay)):
                try:
                    await self.controller.driver.wait_leadership_change(
                        self.controller.driver.leadership()
                    )
                except DriverStoppedError:
                    await trio.sleep_forever()  # no leadership news any more: just the delay
            delay = min(delay * 2, RETRY_DELAY_SECONDS_MAX)

    async def _send(self, leader: int, api_key: ApiKey, body: dict[str, Any]) -> dict[str, Any]:
        address = self.voters.get(leader)
        if address is None:
            raise _Unreachable(f"node {leader} is not a known voter")
        self.forwarded += 1
        idle = self._idle.setdefault(address, [])
        stream = idle.pop() if idle else None
        if stream is None:
            with trio.move_on_after(self.connect_timeout_seconds):
                stream = await trio.open_tcp_stream(*address)
            if stream is None:
                raise _Unreachable(f"no connection to node {leader} at {address[0]}:{address[1]}")
        try:
            response = await self._exchange(stream, leader, api_key, body)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        if len(idle) < IDLE_CONNECTIONS_MAX and not self._closed:
            idle.append(stream)  # kept for the next call (heartbeats come every second)
        else:
            await stream.aclose()
        if response.error_code != ErrorCode.NONE:
            raise DwalError(response.error_code, response.error_message)
        return check_response(api_key, response.body)

    async def _exchange(
        self, stream: trio.SocketStream, leader: int, api_key: ApiKey, body: dict[str, Any]
    ) -> Response:
        correlation_id = next(self._correlation)
        request = Request(
            api_key=int(api_key),
            api_version=0,
            correlation_id=correlation_id,
            client_id=f"dwal-broker-{self.node_id}",
            body=body,
        )
        await stream.send_all(encode_request(request))
        decoder = FrameDecoder(frame_bytes_max=self.response_bytes_max)
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                break
            data = await stream.receive_some(64 * 1024)
            if not data:
                raise _Unreachable(f"node {leader} closed the connection")
            decoder.feed(data)
        header, tail = frame
        response = parse_response(header, tail)
        if response.correlation_id != correlation_id:
            raise ProtocolError("the controller answered another request")
        return response

    async def aclose(self) -> None:
        """Close the idle connections; no call may be made afterwards."""
        self._closed = True
        for streams in self._idle.values():
            while streams:
                await streams.pop().aclose()


class _Unreachable(Exception):
    """The controller's address is unknown or its connection failed: try again."""
