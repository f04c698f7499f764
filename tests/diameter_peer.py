"""A gateway's side of Gy in the tests: python-diameter (an implementation no one here
wrote), its client node connected to the server's Diameter listener, its threads driven
from the tests' event loop through asyncio.to_thread."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from diameter.message.avp.grouped import (
    MultipleServicesCreditControl,
    RequestedServiceUnit,
    SubscriptionId,
    UsedServiceUnit,
)
from diameter.message.commands import CreditControlRequest
from diameter.message.constants import APP_DIAMETER_CREDIT_CONTROL_APPLICATION
from diameter.node import Node
from diameter.node.application import SimpleThreadingApplication

SERVER_HOST, SERVER_REALM = "creditline.localdomain", "localdomain"
E164 = 0
_sessions = itertools.count(1)


class Gateway:
    """One connected peer: sends CCRs, answers the server's RAR and ASR (kept in
    `requests` for the test to see)."""

    def __init__(self, port: int, origin_host: str = "gw.test", realm: str = "test") -> None:
        self.origin_host, self.realm = origin_host, realm
        self.node = Node(origin_host, realm, ip_addresses=["127.0.0.1"])
        self.node.idle_timeout = 3600  # (its watchdog: not during a test)
        self.node.wakeup_interval = 0.2  # (its select timeout: 6 s makes each stop slow)
        peer = self.node.add_peer(f"aaa://{SERVER_HOST}:{port};transport=tcp", SERVER_REALM,
                                  ip_addresses=["127.0.0.1"], is_persistent=True,
                                  is_default=True)
        self.requests: queue.Queue[Any] = queue.Queue()
        self.app = SimpleThreadingApplication(
            APP_DIAMETER_CREDIT_CONTROL_APPLICATION, is_auth_application=True,
            request_handler=self._on_request)
        # (python-diameter routes a request it receives by its Destination-Realm, which for
        # the server's RAR and ASR is the gateway's own realm)
        self.node.add_application(self.app, [peer], realms=[realm])

    def _on_request(self, app: SimpleThreadingApplication, request: Any) -> Any:
        self.requests.put(request)
        return app.generate_answer(request, result_code=2001)

    def start(self) -> None:
        self.node.start()
        self.app.wait_for_ready(timeout=10)

    def stop(self) -> None:
        self.node.stop(wait_timeout=5)

    def ccr(self, session_id: str, request_type: int, number: int,
            subscription: str | None = None, *blocks: MultipleServicesCreditControl,
            **fields: Any) -> CreditControlRequest:
        ccr = CreditControlRequest()
        ccr.session_id = session_id
        ccr.origin_host = self.origin_host.encode()
        ccr.origin_realm = self.realm.encode()
        ccr.destination_realm = SERVER_REALM.encode()
        ccr.auth_application_id = APP_DIAMETER_CREDIT_CONTROL_APPLICATION
        ccr.service_context_id = "32251@3gpp.org"
        ccr.cc_request_type = request_type
        ccr.cc_request_number = number
        if subscription is not None:
            ccr.subscription_id = [SubscriptionId(subscription_id_type=E164,
                                                  subscription_id_data=subscription)]
        if blocks:
            ccr.multiple_services_credit_control = list(blocks)
        for name, value in fields.items():
            setattr(ccr, name, value)
        return ccr

    async def send(self, request: Any, timeout_s: int = 10) -> Any:
        return await asyncio.to_thread(self.app.send_request, request, timeout_s)

    def session_id(self) -> str:
        return f"{self.origin_host};{next(_sessions)};1"


def mscc(rating_group: int, requested: dict[str, int] | None = None,
         used: dict[str, int] | None = None, **fields: Any) -> MultipleServicesCreditControl:
    """One Multiple-Services-Credit-Control: requested None: no RSU; {}: an empty one."""
    block = MultipleServicesCreditControl(rating_group=rating_group, **fields)
    if requested is not None:
        block.requested_service_unit = RequestedServiceUnit(**requested)
    if used is not None:
        block.used_service_unit = [UsedServiceUnit(**used)]
    return block


@asynccontextmanager
async def gateway(port: int, **kwargs: Any) -> AsyncIterator[Gateway]:
    """A connected gateway (started and stopped off the event loop: its node blocks while
    it waits for the server, which runs on the loop)."""
    peer = Gateway(port, **kwargs)
    await asyncio.to_thread(peer.start)
    try:
        yield peer
    finally:
        # (not waited for: its DPR and its threads' ends take it seconds; the server
        # answers the DPR, or tells it with its own DPR when it stops first)
        threading.Thread(target=peer.stop, name="gateway-stop", daemon=True).start()
