"""
The REST control plane under C{/v1} (protocol §19).

L{install_rest} mounts one resource per endpoint family on the
L{meteredrt.site.V1Resource}:

  - C{/v1/tokens} (L{meteredrt.rest.tokens})
  - C{/v1/channels/{channel}/peers|publish} (L{meteredrt.rest.channels})
  - C{/v1/peers/{peerId}} (L{meteredrt.rest.peers})
  - C{/v1/usage} (L{meteredrt.rest.usage})
  - C{/v1/openapi.json} (L{meteredrt.rest.openapi})

All of them share one L{RequestGuard} (authentication, per-key and per-IP
rate limits, the handler timeout) and the JSON behaviour of
L{meteredrt.rest.base.JsonResource}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from meteredrt.clientaddress import TrustedProxies
from meteredrt.hub import Hub
from meteredrt.interfaces import IKeyStore, IMeter, IUsageReport
from meteredrt.metrics import Metrics
from meteredrt.rest.base import JsonResource, RequestGuard, RestLimits, Route
from meteredrt.rest.channels import ChannelsResource
from meteredrt.rest.openapi import OpenApiResource, build_document
from meteredrt.rest.peers import PeersResource
from meteredrt.rest.tokens import TokensResource
from meteredrt.rest.usage import UsageResource
from meteredrt.site import V1Resource
from meteredrt.turn import TurnApiClient

__all__ = ["RestLimits", "install_rest"]


def install_rest(
    v1: V1Resource,
    *,
    keys: IKeyStore,
    hub: Hub,
    meter: IMeter,
    clock: IReactorTime,
    turn: TurnApiClient | None = None,
    limits: RestLimits | None = None,
    trusted_proxies: TrustedProxies = (),
    metrics: Metrics | None = None,
    usage: IUsageReport | None = None,
) -> RequestGuard:
    """
    Put the REST resources under C{v1}.

    @param keys: authenticates C{sk_id_…:sk_secret_…} and finds the app.
    @param hub: lists presence, publishes and kicks.
    @param meter: answers C{/v1/usage}, unless C{usage} is given.
    @param clock: rate limits, token times and handler timeouts.
    @param turn: mints TURN credentials for C{POST /v1/tokens} with
        C{"turn": true}.
    @param trusted_proxies: the proxies whose C{X-Forwarded-For} names the
        client that the per-IP limit counts.
    @param metrics: counts requests by route and status.
    @param usage: answers C{/v1/usage} instead of the meter: in a cluster,
        with the whole cluster's figures.
    @return: the guard the resources share.
    """
    guard = RequestGuard(keys, clock, limits or RestLimits(), trusted_proxies, metrics)
    families: dict[bytes, JsonResource] = {
        b"tokens": TokensResource(guard, turn),
        b"channels": ChannelsResource(guard, hub),
        b"peers": PeersResource(guard, hub),
        b"usage": UsageResource(guard, usage if usage is not None else meter),
    }
    routes: list[Route] = [route for resource in families.values() for route in resource.routes]
    families[b"openapi.json"] = OpenApiResource(guard, build_document([*routes, *OpenApiResource.routes]))
    for name, resource in families.items():
        v1.putChild(name, resource)
    return guard
