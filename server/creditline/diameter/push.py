"""What the charging core asks of the network, pushed to the peer that owns the session:
RAR for REAUTHORIZATION_NEEDED (a top-up, a credit, an add-on, a renewal, a plan change;
RFC 4006 §5.5), ASR for ACCOUNT_BARRED (RFC 4006 §5.6, RFC 6733 §8.5).

Every process reads the notifications of every partition (one subscription of its event
hub); only the process holding the session's peer connection sends, so each request goes
out once. A session's rating groups asked in one charging step go in one RAR (Rating-Group
when there is one; none, meaning all, when there are more). The outcome, logged: the
peer's answer (2001: the gateway sends its CCR-U, or for an ASR its CCR-T; 5002: it no
longer has the session, forgotten here); no answer within diameter_request_timeout_s, or
the peer gone: nothing more is sent, and the session ends by supervision when no request
comes (its validity time, times supervision_factor).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

from creditline.diameter import message as m
from creditline.diameter.codec import Avp
from creditline.diameter.dictionary import (
    AUTHORIZE_ONLY,
    CREDIT_CONTROL_APPLICATION,
    AvpCode,
    Command,
    ResultCode,
)
from creditline.diameter.gy import GyApplication
from creditline.diameter.peer import PeerGoneError
from creditline.events.hub import EventHub, StreamEvent, Subscription

log = logging.getLogger(__name__)
REAUTHORIZATION, BARRED = "reauthorization_needed", "account_barred"
# Notifications waiting to be pushed at most (past it some are dropped, and logged: those
# sessions re-authorise at their validity time instead)
QUEUE_EVENTS = 10_000


class NetworkPush:
    def __init__(self, hub: EventHub, gy: GyApplication, origin_host: str,
                 origin_realm: str) -> None:
        self._hub = hub
        self._gy = gy
        self._origin = [m.text(AvpCode.ORIGIN_HOST, origin_host),
                        m.text(AvpCode.ORIGIN_REALM, origin_realm)]
        self._subscription = Subscription(
            partitions=frozenset(range(hub.partitions)), account_ids=None,
            event_types=frozenset({REAUTHORIZATION, BARRED}),
            queue=asyncio.Queue(maxsize=QUEUE_EVENTS))
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.sent = 0  # requests answered 2001

    async def start(self) -> None:
        await self._hub.join(self._subscription)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._hub.leave(self._subscription)
        for task in [self._task, *self._sending]:
            if task is not None:
                task.cancel()

    async def _run(self) -> None:
        queue = self._subscription.queue
        while True:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            if self._subscription.overflowed.is_set():
                self._subscription.overflowed.clear()
                log.warning("diameter: notifications to push came faster than they went: "
                            "some RAR/ASR dropped (their sessions ask at validity time)")
            self._push(events)

    def _push(self, events: list[StreamEvent]) -> None:
        asked: dict[str, set[str]] = defaultdict(set)  # session id -> rating groups
        for event in events:
            if event.fields.get("t") == BARRED:
                for session_id in self._gy.sessions_of(event.fields.get("a", "")):
                    self._spawn(self._abort(session_id))
            elif event.fields.get("s") in self._gy.sessions:
                asked[event.fields["s"]].add(event.fields.get("rg", ""))
        for session_id, rating_groups in asked.items():
            self._spawn(self._reauthorize(session_id, rating_groups))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _reauthorize(self, session_id: str, rating_groups: set[str]) -> None:
        avps = [m.u32(AvpCode.RE_AUTH_REQUEST_TYPE, AUTHORIZE_ONLY)]
        if len(rating_groups) == 1:
            rating_group = next(iter(rating_groups)).split(".")[0]
            if rating_group.isdigit():
                avps.append(m.u32(AvpCode.RATING_GROUP, int(rating_group)))
        await self._send(session_id, Command.RE_AUTH, avps)

    async def _abort(self, session_id: str) -> None:
        await self._send(session_id, Command.ABORT_SESSION, [])

    async def _send(self, session_id: str, command: Command, avps: list[Avp]) -> None:
        session = self._gy.sessions.get(session_id)
        if session is None or not session.peer.is_open:
            return
        peer = session.peer
        request = [m.text(AvpCode.SESSION_ID, session_id), *self._origin,
                   m.text(AvpCode.DESTINATION_REALM, peer.origin_realm),
                   m.text(AvpCode.DESTINATION_HOST, peer.origin_host),
                   m.u32(AvpCode.AUTH_APPLICATION_ID, CREDIT_CONTROL_APPLICATION), *avps]
        try:
            answer = await peer.request(command, CREDIT_CONTROL_APPLICATION, request)
        except (PeerGoneError, TimeoutError) as error:
            log.warning("diameter %s of session %s to %s: no answer (%s); the session ends "
                        "by supervision unless the gateway asks", command.name, session_id,
                        peer.origin_host, type(error).__name__)
            return
        code_avp = m.find(answer.avps, AvpCode.RESULT_CODE)
        code = m.unsigned32(code_avp) if code_avp is not None else 0
        if code == ResultCode.SUCCESS:
            self.sent += 1
        elif code == ResultCode.UNKNOWN_SESSION_ID:
            self._gy.forget(session_id)
        else:
            log.warning("diameter %s of session %s: %s answered %d", command.name, session_id,
                        peer.origin_host, code)
