"""
C{GET /v1/openapi.json}: the OpenAPI 3.1 description of every HTTP route.

L{build_document} turns the same L{Route} tables that dispatch requests into
the document, with the request/response schemas in L{SCHEMAS}, the error
envelope, and the routes served outside C{meteredrt.rest} (the WebSocket
upgrade at C{/v1}, C{/healthz}, C{/readyz}) from L{SITE_ROUTES}. A test
walks the live Resource tree and checks it against this document both ways.
L{OpenApiResource} serves it without authentication.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from meteredrt.apps import ACTIONS
from meteredrt.auth import MAX_CHANNEL_CLAIMS, MAX_PERMISSION_CLAIMS, MAX_TOKEN_LIFETIME
from meteredrt.protocol import MAX_PEER_ID_BYTES
from meteredrt.rest.base import MAX_BODY_BYTES, Call, JsonResource, RequestGuard, Route

OPENAPI_PATH = "/v1/openapi.json"

ROUTES = (
    Route(
        "GET",
        OPENAPI_PATH,
        "getOpenApi",
        "This OpenAPI 3.1 document",
        handler="document",
        response_schema="OpenApiDocument",
        auth=False,
        errors=(429,),
    ),
)

#: Routes whose resources live in L{meteredrt.site}; documented here.
SITE_ROUTES = (
    Route(
        "GET",
        "/v1",
        "connectWebSocket",
        "WebSocket endpoint of the realtime protocol (upgrade only)",
        handler="",
        response_schema="",
        auth=False,
        errors=(426, 429, 503),
        description=(
            "Connect with ?token=<JWT> (secret-key path) or ?key=pk_live_... (publishable key). "
            "A request without 'Upgrade: websocket' is answered 426."
        ),
    ),
    Route(
        "GET",
        "/healthz",
        "getHealth",
        "Liveness: 200 while the process serves HTTP",
        handler="",
        response_schema="Probe",
        auth=False,
        errors=(503,),
    ),
    Route(
        "GET",
        "/readyz",
        "getReadiness",
        "Readiness: 200 when the stores are loaded and the server is not draining, else 503",
        handler="",
        response_schema="Probe",
        auth=False,
        errors=(503,),
    ),
)

_NULLABLE_INT = {"type": ["integer", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "The error envelope of every endpoint.",
        "required": ["error", "message"],
        "properties": {
            "error": {
                "type": "string",
                "enum": [
                    "invalid_request",
                    "channel_reserved",
                    "unauthorized",
                    "channel_not_authorized",
                    "action_not_permitted",
                    "over_message_quota",
                    "not_found",
                    "internal_error",
                ],
            },
            "message": {"type": "string"},
        },
    },
    "Metadata": {"type": "object", "description": "Any JSON object."},
    "TokenRequest": {
        "type": "object",
        "required": ["peerId"],
        "properties": {
            "peerId": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_PEER_ID_BYTES,
                "description": "Printable ASCII; becomes the JWT sub.",
            },
            "channels": {
                "type": "array",
                "maxItems": MAX_CHANNEL_CLAIMS,
                "items": {"type": "string", "minLength": 1},
                "description": "Channel patterns, each covered by the key's channelPatterns.",
            },
            "permissions": {
                "type": "array",
                "maxItems": MAX_PERMISSION_CLAIMS,
                "items": {"type": "string", "enum": sorted(ACTIONS)},
                "description": "A subset of the key's actions; default all of them.",
            },
            "expiresInSec": {"type": "integer", "minimum": 1, "maximum": MAX_TOKEN_LIFETIME, "default": 3600},
            "metadata": {"type": "object", "description": "At most 8 KB serialized; private to the peer."},
            "peerMetadata": {"type": "object", "description": "At most 4 KB serialized; public to other peers."},
            "turn": {
                "type": "boolean",
                "default": False,
                "description": "meteredrt extension: embed fresh Metered TURN credentials of the app in "
                "metadata.iceServers (502 backend_error when the TURN API fails).",
            },
        },
    },
    "TokenResponse": {
        "type": "object",
        "required": ["token", "expiresAt"],
        "additionalProperties": False,
        "properties": {
            "token": {"type": "string", "description": "HS256 JWT; header kid = the sk_id_ key id."},
            "expiresAt": {"type": "integer", "description": "Unix seconds."},
        },
    },
    "PresenceEntry": {
        "type": "object",
        "required": ["peerId"],
        "additionalProperties": False,
        "properties": {
            "peerId": {"type": "string"},
            "metadata": {"type": "object", "description": "The peer's peerMetadata; omitted when it has none."},
        },
    },
    "PeersResponse": {
        "type": "object",
        "required": ["channel", "peers"],
        "additionalProperties": False,
        "properties": {
            "channel": {"type": "string"},
            "peers": {"type": "array", "items": {"$ref": "#/components/schemas/PresenceEntry"}},
        },
    },
    "PublishRequest": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"description": "Any JSON value, null included; delivered as message.data."},
            "from": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_PEER_ID_BYTES,
                "default": "system",
                "description": "Placed in message.from; printable ASCII.",
            },
            "peerMetadata": {
                "type": "object",
                "description": "At most 4 KB serialized; delivered as fromMetadata to subscribers that opted in.",
            },
        },
    },
    "PublishResponse": {
        "type": "object",
        "required": ["channel", "delivered"],
        "additionalProperties": False,
        "properties": {
            "channel": {"type": "string"},
            "delivered": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": "Connections the message reached; null when the broker cannot tell.",
            },
        },
    },
    "KickResponse": {
        "type": "object",
        "required": ["peerId", "closed"],
        "additionalProperties": False,
        "properties": {
            "peerId": {"type": "string"},
            "closed": {"type": "integer", "minimum": 0, "description": "Connections closed with 4020."},
        },
    },
    "Plan": {
        "type": "object",
        "required": [
            "name",
            "maxConcurrentConnections",
            "maxMessagesPerPeriod",
            "overagesAllowed",
            "overagesEnabled",
        ],
        "properties": {
            "name": {"type": ["string", "null"]},
            "maxConcurrentConnections": _NULLABLE_INT,
            "maxMessagesPerPeriod": _NULLABLE_INT,
            "overagesAllowed": {"type": ["boolean", "null"]},
            "overagesEnabled": {"type": ["boolean", "null"]},
        },
    },
    "Usage": {
        "type": "object",
        "required": [
            "appId",
            "periodStartUnix",
            "periodEndUnix",
            "concurrentNow",
            "peakConcurrent",
            "messagesUsed",
            "overageMessages",
            "overageConnections",
            "plan",
        ],
        "properties": {
            "appId": {"type": "string"},
            "periodStartUnix": _NULLABLE_INT,
            "periodEndUnix": _NULLABLE_INT,
            "concurrentNow": {"type": "integer", "minimum": 0},
            "peakConcurrent": {"type": "integer", "minimum": 0},
            "messagesUsed": {"type": "integer", "minimum": 0},
            "overageMessages": {"type": "integer", "minimum": 0},
            "overageConnections": {"type": "integer", "minimum": 0},
            "plan": {"$ref": "#/components/schemas/Plan"},
        },
    },
    "Probe": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]}},
    },
    "OpenApiDocument": {"type": "object", "required": ["openapi", "paths"]},
}

_ERROR_DESCRIPTIONS = {
    400: "invalid_request (malformed body, missing or mistyped field, bad id) or channel_reserved",
    401: "unauthorized: missing or malformed credential, wrong secret, unknown, revoked or publishable key",
    403: "channel_not_authorized, action_not_permitted or over_message_quota",
    413: f"invalid_request: body over {MAX_BODY_BYTES} bytes",
    426: "invalid_request: the request is not a WebSocket upgrade",
    502: "backend_error: the Metered TURN API gave no usable answer (only with \"turn\": true)",
    503: "internal_error: a store or plan lookup failed, a handler timed out, or the server is draining; "
    "retry shortly",
}

_PARAMETERS = {
    "channel": (
        "A concrete channel name. Percent-encode '/' as %2F (demo%2Froom-7); the unencoded form "
        "(demo/room-7) is accepted too: everything between /v1/channels/ and the final segment is the name."
    ),
    "peerId": "The peer's id, percent-encoded.",
}

def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _operation(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if route.path == "/v1":
        responses["101"] = {"description": "Switching Protocols: the WebSocket session starts."}
    else:
        responses["200"] = {"description": "Success.", "content": _json(route.response_schema)}
    for status in route.errors:
        if status == 429:
            responses["429"] = {"$ref": "#/components/responses/TooManyRequests"}
        elif route.response_schema == "Probe" and status == 503:
            responses["503"] = {"description": "Not healthy/ready.", "content": _json("Probe")}
        else:
            responses[str(status)] = {"description": _ERROR_DESCRIPTIONS[status], "content": _json("Error")}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": responses,
        "security": [{"secretKey": []}] if route.auth else [],
    }
    if route.description:
        operation["description"] = route.description
    names = re.findall(r"\{(\w+)\}", route.path)
    if names:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "description": _PARAMETERS[name], "schema": {"type": "string"}}
            for name in names
        ]
    if route.request_schema is not None:
        operation["requestBody"] = {"required": True, "content": _json(route.request_schema)}
    return operation


def build_document(routes: Iterable[Route]) -> dict[str, Any]:
    """
    The OpenAPI 3.1 document for C{routes} plus L{SITE_ROUTES}.
    """
    paths: dict[str, dict[str, Any]] = {}
    for route in (*SITE_ROUTES, *routes):
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meteredrt REST control plane",
            "version": "1",
            "description": (
                "Backends mint connect tokens, list channel peers, publish, kick peers and read usage. "
                "Every error body is {\"error\": code, \"message\": text}; 429 carries Retry-After and no body. "
                "Unknown paths answer 404 not_found; a wrong method answers 405 invalid_request with an Allow header."
            ),
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "The embedded default"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "secretKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "sk_id_...:sk_secret_...",
                    "description": "A secret key pair joined by a colon. Publishable keys are refused.",
                }
            },
            "schemas": SCHEMAS,
            "responses": {
                "Error": {"description": "An error.", "content": _json("Error")},
                "TooManyRequests": {
                    "description": "Per-IP or per-key rate limit; no body.",
                    "headers": {
                        "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer", "minimum": 1}}
                    },
                },
            },
        },
    }


class OpenApiResource(JsonResource):
    """
    C{/v1/openapi.json}, public.
    """

    routes = ROUTES

    def __init__(self, guard: RequestGuard, document: Mapping[str, Any]) -> None:
        super().__init__(guard)
        self._document = document

    def locate(self, postpath: list[bytes]) -> tuple[str, dict[str, bytes]] | None:
        return (OPENAPI_PATH, {}) if not postpath else None

    async def document(self, call: Call) -> Mapping[str, Any]:
        """
        The document built at start-up.
        """
        return self._document
