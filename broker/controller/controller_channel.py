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
from broker.raft.messages import NO_NODE
from protocol import DwalError, ErrorCode, ProtocolError
from protocol.api import ApiKey, check_response
from protocol.frame import FrameDecoder, Request, encode_request, parse_response

logger = logging.getLogger("dwal.controller")

RESPONSE_BYTES_MAX = 16 * 1024 * 1024  # a controller's answer is small; this bounds it
RETRY_DELAY_SECONDS_MIN = 0.02
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
    ) -> None:
        """`apis` answers in process when this node is the active controller (None for a
        node that is no voter); `voters` gives the other voters' controller ports."""
        self.node_id = node_id
        self.controller = controller
        self.apis = apis
        self.voters = voters
        self.connect_timeout_seconds = connect_timeout_seconds
        self._correlation = itertools.count(1)
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
        rotation = itertools.cycle(sorted(self.voters) or [self.node_id])
        while True:
            # The known leader; a node that knows none (a learner before the log reaches it)
            # tries the voters in turn: the active one answers, the others NOT_CONTROLLER.
            leader = self.controller_hint()
            if leader is None and self.voters:
                leader = next(rotation)
            try:
                if leader == self.node_id and self.apis is not None:
                    return await self.apis.handle(api_key, body)
                if leader is not None:
                    with trio.fail_after(max(deadline - trio.current_time(), 0.001)):
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
                await self.controller.driver.wait_leadership_change(
                    self.controller.driver.leadership()
                )
            delay = min(delay * 2, RETRY_DELAY_SECONDS_MAX)

    async def _send(self, leader: int, api_key: ApiKey, body: dict[str, Any]) -> dict[str, Any]:
        address = self.voters.get(leader)
        if address is None:
            raise _Unreachable(f"node {leader} is not a known voter")
        self.forwarded += 1
        with trio.fail_after(self.connect_timeout_seconds):
            stream = await trio.open_tcp_stream(*address)
        async with stream:
            correlation_id = next(self._correlation)
            request = Request(
                api_key=int(api_key),
                api_version=0,
                correlation_id=correlation_id,
                client_id=f"dwal-broker-{self.node_id}",
                body=body,
            )
            await stream.send_all(encode_request(request))
            decoder = FrameDecoder(frame_bytes_max=RESPONSE_BYTES_MAX)
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
        if response.error_code != ErrorCode.NONE:
            raise DwalError(response.error_code, response.error_message)
        return check_response(api_key, response.body)


class _Unreachable(Exception):
    """The controller's address is unknown or its connection failed: try again."""
