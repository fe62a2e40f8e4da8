"""
Tenancy records: L{App}, L{Plan} and L{Key}.

These are plain immutable values shared by the key store, the authenticator,
the REST layer and metering. They carry no behaviour that touches I/O, so
every layer may import them.
"""

from __future__ import annotations

from enum import StrEnum

from attrs import field, frozen

#: The four actions a key or token can grant (protocol §1).
ACTIONS: frozenset[str] = frozenset({"publish", "subscribe", "presence", "send"})

#: At most this many signalling keys per app (protocol §3.3).
MAX_KEYS_PER_APP = 50

#: Defaults for a freshly created publishable key (protocol §3.3: ``send`` off).
PUBLISHABLE_DEFAULT_ACTIONS: frozenset[str] = frozenset({"subscribe", "publish", "presence"})


class KeyType(StrEnum):
    """
    The two credential kinds of protocol §3.
    """

    SECRET = "secret"
    PUBLISHABLE = "publishable"


#: The per-connection message rate (messages per second) and burst (bucket
#: size) of an app without a plan, and of a plan that does not set them
#: (protocol §14: over it, close 4011).
DEFAULT_MESSAGE_RATE = 100.0
DEFAULT_MESSAGE_BURST = 200.0
#: Upper bound on both, so a typo cannot switch the guard off in practice.
MAX_MESSAGE_RATE = 1_000_000.0


def message_rate_problems(rate: float, burst: float) -> list[tuple[str, str]]:
    """
    What is wrong with a per-connection rate and burst, as (field, problem)
    pairs; empty when both are fine.

    A rate of 0 would close every connection once its burst is spent, and a
    burst below 1 at its first frame: both are typos, not policies.
    """
    problems = []
    if not 0 < rate <= MAX_MESSAGE_RATE:
        problems.append(("message_rate", f"must be more than 0 and at most {MAX_MESSAGE_RATE:g}, not {rate:g}"))
    if not 1 <= burst <= MAX_MESSAGE_RATE:
        problems.append(("message_burst", f"must be from 1 to {MAX_MESSAGE_RATE:g}, not {burst:g}"))
    return problems


#: Key id prefixes per type; the server relies on nothing else in an id.
KEY_ID_PREFIX = {KeyType.SECRET: "sk_id_", KeyType.PUBLISHABLE: "pk_live_"}
SECRET_PREFIX = "sk_secret_"


@frozen
class Plan:
    """
    An app's quota plan (protocol §15.1).

    ``None`` for a cap means that axis is unlimited. Money amounts are in
    the operator's billing unit; meteredrt only records them.
    """

    name: str | None = None
    max_concurrent_connections: int | None = None
    max_messages_per_period: int | None = None
    overages_allowed: bool = False
    overages_enabled: bool = True
    overage_rate_per_1000_messages: float = 0.0
    overage_rate_per_connection: float = 0.0
    balance: float = 0.0
    auto_recharge_amount: float = 0.0
    auto_recharge_threshold: float = 0.0
    #: ``"month"`` (calendar month, UTC) is the only period kind so far.
    period: str = "month"
    #: Per-connection token bucket (close 4011 when empty): refill rate in
    #: messages per second, and capacity.
    message_rate: float = DEFAULT_MESSAGE_RATE
    message_burst: float = DEFAULT_MESSAGE_BURST


@frozen
class TurnConfig:
    """
    How to mint Metered TURN credentials for one app (protocol §20.2).

    ``api_base`` defaults to the hosted TURN API of ``app_name``
    (``https://<app_name>.metered.live``); tests and air-gapped operators
    point it elsewhere. ``ttl`` of ``None`` means L{meteredrt.turn.credential_lifetime}.
    """

    app_name: str
    secret_key: str
    region: str | None = None
    ttl: int | None = None
    api_base: str | None = None

    @property
    def base_url(self) -> str:
        """
        The TURN API origin to call.
        """
        return self.api_base or f"https://{self.app_name}.metered.live"


#: The presence webhook event types (docs/webhooks.md), in documentation order.
WEBHOOK_EVENTS: tuple[str, ...] = (
    "peer.online",
    "peer.offline",
    "channel.occupied",
    "channel.vacated",
    "presence.joined",
    "presence.left",
)


@frozen
class WebhookConfig:
    """
    Where and how an app's presence webhooks go (docs/webhooks.md).

    @ivar url: an C{http://} or C{https://} URL the batches are POSTed to.
    @ivar secret: the HMAC-SHA256 key the backend checks signatures with.
    @ivar events: the event types the app wants; others are never stored.
    @ivar offline_grace_seconds: how long a peer (or a channel) must stay
        gone before C{peer.offline} (C{channel.vacated}) is emitted; coming
        back inside it cancels both events.
    @ivar retry_seconds: how long one batch is retried before it is set
        aside as failed (C{meteredrt webhooks replay} sends it again).
    """

    url: str
    secret: str
    events: frozenset[str] = frozenset(WEBHOOK_EVENTS)
    offline_grace_seconds: float = 3.0
    retry_seconds: float = 86400.0

    def wants(self, event_type: str) -> bool:
        """
        Whether events of this type go to this app's backend.
        """
        return event_type in self.events


@frozen
class App:
    """
    A tenant. ``plan`` is ``None`` for an unmetered app (the self-hosted
    default).
    """

    app_id: str
    plan: Plan | None = None
    suspended: bool = False
    #: Per-app TURN configuration, or ``None`` when the app does not mint
    #: TURN credentials.
    turn: TurnConfig | None = None
    #: Per-app presence webhooks, or ``None`` when the app has none.
    webhooks: WebhookConfig | None = None


def message_limits(app: App | None) -> tuple[float, float]:
    """
    The per-connection message rate and burst of an app's connections: its
    plan's, or the defaults for an app without a plan.
    """
    plan = None if app is None else app.plan
    if plan is None:
        return DEFAULT_MESSAGE_RATE, DEFAULT_MESSAGE_BURST
    return plan.message_rate, plan.message_burst


@frozen
class Key:
    """
    A signalling key (protocol §3.3).

    ``secret`` is only set for secret keys; it is the HMAC key for JWTs and
    half of the REST credential.
    """

    key_id: str
    app_id: str
    type: KeyType
    channel_patterns: tuple[str, ...]
    actions: frozenset[str]
    secret: str | None = None
    allowed_origins: tuple[str, ...] = ()
    auto_inject_turn: bool = True
    revoked: bool = False
    created_at: float = 0.0
    #: ``"config"`` for keys declared in the TOML file, ``"store"`` for keys
    #: created with the CLI; config keys override stored ones of the same id.
    source: str = field(default="store")

    @property
    def active(self) -> bool:
        """
        Whether this key may authenticate anything.
        """
        return not self.revoked
