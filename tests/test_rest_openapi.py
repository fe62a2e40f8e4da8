"""
Tests for L{meteredrt.rest.openapi}: the document matches the live Resource
tree both ways, is internally consistent, and live responses validate
against it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from meteredrt.rest.base import JsonResource
from meteredrt.site import JsonRoot, NotFound
from tests.rest_support import Reply, RestWorld, check_response, validate


def _methods_of(resource: Resource) -> set[str]:
    """
    The methods a plain C{twisted.web} resource serves: its C{render_*}
    methods but HEAD, or GET for a custom C{render} (the WebSocket upgrade at
    C{/v1}).
    """
    # Resource answers HEAD for any GET; OpenAPI leaves HEAD implicit too.
    methods = {name[len("render_"):] for name in dir(resource) if name.startswith("render_")} - {"HEAD"}
    if methods:
        return methods
    if type(resource).render not in (Resource.render, JsonRoot.render, NotFound.render):
        return {"GET"}
    return set()


def tree_routes(resource: Resource, path: str = "") -> Iterator[tuple[str, str]]:
    """
    Every (OpenAPI path, method) the Resource tree serves.
    """
    for name, child in resource.children.items():
        child_path = f"{path}/{name.decode()}"
        if isinstance(child, JsonResource):
            for route in child.routes:
                if not (route.path == child_path or route.path.startswith(child_path + "/")):
                    raise AssertionError(f"{route.path} is mounted at {child_path}")
                yield route.path, route.method
        else:
            for method in _methods_of(child):
                yield child_path, method
        yield from tree_routes(child, child_path)


def document_routes(document: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, operations in document["paths"].items() for method in operations}


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


class SyncTests(SynchronousTestCase):
    """
    C{openapi.json} and the Resource tree name the same routes.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_tree_and_document_agree(self) -> None:
        """
        Every route of the tree is documented and every documented route is
        in the tree.
        """
        in_tree = set(tree_routes(self.world.root))
        documented = document_routes(self.world.document)
        self.assertEqual(in_tree - documented, set(), "served but not documented")
        self.assertEqual(documented - in_tree, set(), "documented but not served")
        self.assertIn(("/healthz", "GET"), in_tree)
        self.assertIn(("/v1/channels/{channel}/publish", "POST"), in_tree)

    def test_documented_routes_answer(self) -> None:
        """
        A request to each documented route reaches an endpoint: never a 404
        or 405.
        """
        for path, method in sorted(document_routes(self.world.document)):
            concrete = re.sub(r"\{\w+\}", "demo%2Fx", path)
            body = {"peerId": "u"} if path == "/v1/tokens" else {"data": 1} if method == "POST" else None
            reply = self.world.request(method, concrete, body=body)
            self.assertNotIn(reply.status, (404, 405), f"{method} {concrete}")

    def test_document_is_consistent(self) -> None:
        """
        OpenAPI 3.1; every $ref resolves; operation ids are unique; every
        authenticated operation documents 401 and uses the secret-key
        scheme; path parameters are declared.
        """
        document = self.world.document
        self.assertEqual(document["openapi"], "3.1.0")
        for ref in _refs(document):
            _, section, name = ref.removeprefix("#/").split("/")
            self.assertIn(name, document["components"][section], ref)
        ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
        self.assertEqual(len(ids), len(set(ids)))
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                names = re.findall(r"\{(\w+)\}", path)
                self.assertEqual([p["name"] for p in operation.get("parameters", [])], names)
                if operation["security"]:
                    self.assertEqual(operation["security"], [{"secretKey": []}])
                    self.assertIn("401", operation["responses"], f"{method} {path}")
                    self.assertIn("429", operation["responses"], f"{method} {path}")
        self.assertEqual(document["components"]["securitySchemes"]["secretKey"]["scheme"], "bearer")

    def test_served_as_json(self) -> None:
        """
        The document is served with a JSON content type.
        """
        reply = self.world.get("/v1/openapi.json", key=None)
        self.assertEqual(reply.header("Content-Type"), "application/json")
        self.assertEqual(json.loads(reply.raw), self.world.document)


class ContractTests(SynchronousTestCase):
    """
    Live responses of every operation validate against the document.

    (Every request a L{RestWorld} sends in any test is checked the same
    way; these cover the routes the other modules do not.)
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_every_operation(self) -> None:
        """
        Each operation's success answer validates.
        """
        session, _ = self.world.connect("u_1", peer_metadata={"name": "Ada"})
        self.world.subscribe(session, "demo/a")
        self.assertEqual(self.world.post("/v1/tokens", {"peerId": "u"}).status, 200)
        self.assertEqual(self.world.get("/v1/channels/demo%2Fa/peers").status, 200)
        self.assertEqual(self.world.post("/v1/channels/demo%2Fa/publish", {"data": 1}).status, 200)
        self.assertEqual(self.world.get("/v1/usage").status, 200)
        self.assertEqual(self.world.delete("/v1/peers/u_1").status, 200)
        self.assertEqual(self.world.get("/healthz", key=None).status, 200)
        self.assertEqual(self.world.get("/readyz", key=None).status, 200)

    def test_websocket_endpoint_without_upgrade(self) -> None:
        """
        A plain GET of C{/v1} is the documented 426 with the error envelope.
        """
        reply = self.world.get("/v1", key=None)
        self.assertEqual((reply.status, reply.json["error"]), (426, "invalid_request"))

    def test_checker_catches_drift(self) -> None:
        """
        The checker refuses a body that breaks its schema, an undocumented
        status, and a 429 without Retry-After.
        """
        from twisted.web.http_headers import Headers

        document = self.world.document
        json_headers = Headers({"content-type": ["application/json"]})
        wrong = Reply(200, json_headers, json.dumps({"peerId": "u", "closed": -1}).encode())
        self.assertTrue(check_response(document, "DELETE", "/v1/peers/u", wrong))
        extra = Reply(200, json_headers, json.dumps({"token": "t", "expiresAt": 1, "x": 1}).encode())
        self.assertTrue(check_response(document, "POST", "/v1/tokens", extra))
        undocumented = Reply(418, json_headers, b"{}")
        self.assertTrue(check_response(document, "GET", "/v1/usage", undocumented))
        bare = Reply(429, Headers(), b"")
        self.assertEqual(check_response(document, "GET", "/v1/usage", bare), ["429 without Retry-After"])
        self.assertEqual(validate({"type": "string", "pattern": "x"}, "x", document), [
            "$: validator does not know keyword 'pattern'"
        ])
