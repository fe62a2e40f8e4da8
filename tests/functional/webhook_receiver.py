"""
A real webhook receiver for the functional tests: a C{twisted.web} site on
a loopback port that checks every request's signature with
L{meteredrt.backend.verify_webhook}, answers with the statuses it is told
to, and keeps the events it accepted.

Main name: L{start_receiver}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from meteredrt.backend import SignatureError, verify_webhook


class WebhookReceiver(Resource):
    """
    The backend's endpoint. C{statuses} are answered in turn (then 200);
    events of requests answered 2xx are kept in C{accepted}, in arrival
    order; C{requests} counts every POST.
    """

    isLeaf = True

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.statuses: list[int] = []
        self.accepted: list[dict[str, Any]] = []
        self.requests = 0
        self.bad_signatures = 0

    def render_POST(self, request: Request) -> bytes:
        self.requests += 1
        body = request.content.read()
        try:
            events = verify_webhook(
                self.secret, request.getHeader("Metered-Signature"), body, now=time.time()
            )
        except SignatureError:
            self.bad_signatures += 1
            request.setResponseCode(401)
            return b"bad signature"
        status = self.statuses.pop(0) if self.statuses else 200
        request.setResponseCode(status)
        if 200 <= status < 300:
            self.accepted.extend(events)
        return b"thanks"

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        """
        The accepted events of one type.
        """
        return [event for event in self.accepted if event["type"] == event_type]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        """
        Poll until C{condition()} holds; fail after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; accepted so far: {self.accepted}")
            await deferLater(reactor, 0.05, lambda: None)


async def start_receiver(case: TestCase, secret: str) -> tuple[WebhookReceiver, str]:
    """
    Listen on a free loopback port until the test ends; fires with the
    receiver and its URL.
    """
    receiver = WebhookReceiver(secret)
    port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return receiver, f"http://127.0.0.1:{port.getHost().port}/metered-hooks"


