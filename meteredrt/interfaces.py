"""
The seams of meteredrt, as zope interfaces.

Everything the hub and the adapters need from state that may live outside
this process goes through one of these:

  - L{IKeyStore}: apps, plans and keys (SQLite + TOML today).
  - L{IBroker}: moving envelopes between nodes (in memory on one node;
    through Redis pub/sub in a cluster).
  - L{IPresence}: channel membership and the peer directory, with connection
    refcounts (in memory on one node; in Redis in a cluster, so it survives
    a node).
  - L{IMeter}: concurrent-connection admission and message counting.
  - L{IUsageReport}: the usage figures C{GET /v1/usage} reports.
  - L{ITurnProvider}: TURN credentials for the welcome frame.
  - L{IConnectionSink}: what the hub sees of one client connection.
  - L{IPresenceObserver}: presence transitions, for webhooks.
  - L{IWebhookMarks}: which peers and channels the backend was told are
    present, and the going-aways waiting out their grace (in memory on one
    node; in Redis in a cluster, shared by the nodes).
  - L{IWebhookOutbox}: the durable queue of webhook events.

Methods that may have to cross the network in some implementation return
Deferreds even when the in-memory implementation answers at once; the hub
awaits them, and an already-fired Deferred keeps the synchronous ordering
the single-node case relies on. A seam that cannot reach the shared state
an operation needs raises L{BackendUnavailable}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Sequence

    from twisted.internet.defer import Deferred

    from meteredrt.apps import App, Key, KeyType, Plan
    from meteredrt.membership import Joining, Member
    from meteredrt.protocol import OutboundFrame
    from meteredrt.webhooks.events import WebhookEvent
    from meteredrt.webhooks.marks import Announcement, Where
    from meteredrt.webhooks.outbox import OnlineMark, OutboxStatus, StoredEvent


class StoreUnavailable(Exception):
    """
    A look-up the store could not answer from memory while its database is
    unreachable: a key it does not know may have been created since. The
    caller answers with a transient error (close 1011, HTTP 503), never as
    for a key that does not exist.
    """


class BackendUnavailable(Exception):
    """
    A seam cannot reach the shared state an operation needs (in a cluster,
    Redis) right now. Clients see C{backend_error}, REST callers a 503,
    both with this exception's message.
    """


class IKeyStore(Interface):
    """
    Apps, plans and signalling keys.

    Look-ups on the connect and REST paths are synchronous and served from
    memory; changes go to durable storage and return Deferreds.
    """

    def key(key_id: str) -> Key | None:
        """
        The active or revoked L{meteredrt.apps.Key} with this id, or ``None``.

        @raise StoreUnavailable: for a key not in memory while the database
            cannot be reached.
        """

    def app(app_id: str) -> App | None:
        """
        The L{meteredrt.apps.App} with this id, or ``None``.
        """

    def apps() -> list[App]:
        """
        Every known app, ordered by id.
        """

    def keys_of(app_id: str) -> list[Key]:
        """
        Every key of one app (revoked ones included), ordered by id.
        """

    def create_app(app_id: str, plan: Plan | None = None) -> Deferred[App]:
        """
        Create an app. Fires with the L{App}; fails with L{ValueError} if it
        exists.
        """

    def create_key(
        app_id: str,
        type: KeyType,
        channel_patterns: tuple[str, ...],
        actions: frozenset[str],
        allowed_origins: tuple[str, ...] = (),
        auto_inject_turn: bool = True,
    ) -> Deferred[Key]:
        """
        Create a key with fresh random id (and secret). Fires with the L{Key}.
        """

    def revoke_key(key_id: str) -> Deferred[bool]:
        """
        Revoke a key. Fires with ``True`` if it existed.
        """

    def set_plan(app_id: str, plan: Plan | None) -> Deferred[App]:
        """
        Replace an app's plan. Fires with the new L{App}.
        """


class IConnectionSink(Interface):
    """
    One live client connection, as the hub sees it: somewhere to put frames.
    """

    conn_id = Attribute("A cluster-wide unique id of this connection (str).")

    def send_frame(frame: OutboundFrame) -> None:
        """
        Queue one L{meteredrt.protocol.OutboundFrame} for this connection, in
        order. Never blocks; a connection whose outbound buffer is over its
        limit closes itself.
        """

    def close(code: int, reason: str) -> None:
        """
        Close the WebSocket with this code.
        """


class IDeliveryTarget(Interface):
    """
    The node-local receiver of what an L{IBroker} routes: the hub.
    """

    def deliver(app_id: str, envelope: object) -> int:
        """
        Hand one routed envelope (L{meteredrt.envelopes}) to local
        connections. Called in the order the broker received envelopes from
        any one sender.

        @return: how many local connections it reached.
        """


class IBroker(Interface):
    """
    Routes envelopes to the nodes that hold the receiving connections.

    Implementations must preserve per-sender FIFO: two envelopes published
    by one connection reach every node in the order they were published.
    """

    def attach(target: IDeliveryTarget) -> None:
        """
        Set this node's receiver. Called once, before any routing.
        """

    def watch_channel(app_id: str, channel: str) -> Deferred[None]:
        """
        This node now has local subscribers to a concrete channel. Fires once
        the broker will route that channel's envelopes here.
        """

    def unwatch_channel(app_id: str, channel: str) -> Deferred[None]:
        """
        This node's last local subscriber of a concrete channel has left.
        """

    def watch_pattern(app_id: str, pattern: str) -> Deferred[None]:
        """
        Like L{watch_channel} for a wildcard subscription pattern.
        """

    def unwatch_pattern(app_id: str, pattern: str) -> Deferred[None]:
        """
        Like L{unwatch_channel} for a wildcard subscription pattern.
        """

    def watch_peer(app_id: str, peer_id: str) -> Deferred[None]:
        """
        This node holds a connection of this peer: route its directs here.
        """

    def unwatch_peer(app_id: str, peer_id: str) -> Deferred[None]:
        """
        This node's last connection of this peer has closed.
        """

    def publish(app_id: str, channel: str, envelope: object) -> Deferred[int | None]:
        """
        Route an envelope to every node watching the channel or a pattern
        matching it. Fires when it is accepted for routing, with the number
        of connections reached when the broker knows it, else ``None``.
        """

    def direct(app_id: str, peer_id: str, envelope: object) -> Deferred[int]:
        """
        Route an envelope (a C{DirectMessage} or a C{Disconnect}) to every
        connection of a peer, on every node, in one step: finding the peer's
        connections and handing them the envelope are one call, so a C{send}
        costs one round trip and a kick can report an exact count.

        @return: fires with how many connections it was routed to, not
            counting the C{DirectMessage}'s sending connection (0 means the
            peer is not connected); fails with L{BackendUnavailable} when
            the peer could be on another node and that cannot be reached.
        """


class IPresence(Interface):
    """
    Channel membership and the peer directory, refcounted per connection.

    An implementation announces the C{joined}/C{left} deltas its changes
    cause itself, in the same atomic step as the change, as
    L{meteredrt.envelopes.PresenceChange}s: to the attached target for this
    node's connections, and to the other nodes by its own means. That is
    what keeps snapshots and deltas from disagreeing (§10.2): a snapshot
    (L{Joining}) carries the version of the membership it shows, and each
    delta the version it made.
    """

    def attach(target: IDeliveryTarget) -> None:
        """
        Set where this node's presence deltas go (the hub). Called once.
        """

    def add_member(
        app_id: str,
        channel: str,
        peer_id: str,
        conn_id: str,
        metadata: dict[str, Any] | None,
        *,
        snapshot: bool,
    ) -> Deferred[Joining]:
        """
        Record that a connection of a peer subscribed to a concrete channel;
        if the peer was not a member, announce its C{joined} (to everyone
        but this connection). Fires with the L{Joining}: whether it was new,
        the membership version, and, when C{snapshot} is true, the members
        read in the same step. Without C{snapshot} the members are not read
        at all (L{Joining.members} is C{None}): only a subscriber holding
        C{presence} is shown them, and reading them makes a join cost as
        much as the channel is big.
        """

    def remove_member(app_id: str, channel: str, peer_id: str, conn_id: str) -> Deferred[Member | None]:
        """
        Forget one connection's membership; if that was the peer's last
        connection in the channel, announce its C{left} and fire with its
        L{meteredrt.membership.Member}, else with ``None``.
        """

    def members(app_id: str, channel: str) -> Deferred[list[Member]]:
        """
        Fires with the channel's members, one L{Member} per peerId, ordered
        by join time.
        """

    def snapshot(app_id: str, channel: str) -> Deferred[Joining]:
        """
        Fires with the channel's members and the membership version they
        show, read in one step (a L{Joining} whose C{first} is C{False}).
        """

    def add_connection(app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        """
        Record a live connection of a peer (the direct-message directory).
        """

    def remove_connection(app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        """
        Forget a closed connection in one step: every channel membership it
        still holds ends (announcing C{left} where it was the peer's last
        connection) and it leaves the peer directory.
        """

    def connections_of(app_id: str, peer_id: str) -> Deferred[frozenset[str]]:
        """
        Fires with the frozenset of live connection ids of a peer.
        """


class IUsageReport(Interface):
    """
    What C{GET /v1/usage} answers: one node's figures
    (L{meteredrt.metering.Meter}), or the cluster's
    (L{meteredrt.clusterusage.ClusterUsage}).
    """

    def usage(app: App) -> Deferred[dict[str, object]]:
        """
        Fires with the app's usage report as the JSON object of §19.6.
        """


class IMeter(IUsageReport):
    """
    Usage counting and quota decisions (protocol §15), and the node's own
    usage report.

    The hot-path calls answer from memory; implementations flush counts to
    durable storage on their own schedule.
    """

    def admit_connection(app: App) -> Deferred[bool]:
        """
        A connection of this app authenticated. Fires with ``True`` if it is
        admitted (and then counted until L{release_connection}), ``False``
        for close 4010.
        """

    def release_connection(app_id: str) -> None:
        """
        An admitted connection closed.
        """

    def count_message(app: App) -> Deferred[bool]:
        """
        One publish/send/REST publish passed validation and authorization.
        Fires with ``True`` to deliver it, ``False`` to soft-drop it
        (``over_message_quota``). Either way it is counted. Fails with a
        L{BackendUnavailable} (``backend_error``, not counted) when the
        shared state the decision needs cannot be reached (in a cluster,
        the quota of an app with a message cap, in Redis).
        """


class ITurnProvider(Interface):
    """
    TURN credentials for an app's welcome frames (protocol §20).
    """

    def ice_servers(app: App, ttl: int) -> Deferred[list[dict[str, Any]] | None]:
        """
        Fires with a list of RTCIceServer dicts, or ``None`` when none could
        be had in time (the welcome then goes out without them).
        """


class IPresenceObserver(Interface):
    """
    Told of the presence transitions an L{IPresence} makes, for webhooks:
    each by the presence step that made it, so each exactly once.

    Called on the hub's path (connect, subscribe, close), so an
    implementation must only take note and return at once.
    """

    def peer_connected(app_id: str, peer_id: str) -> None:
        """
        The peer's first connection is up.
        """

    def peer_disconnected(app_id: str, peer_id: str) -> None:
        """
        The peer's last connection has closed.
        """

    def member_joined(app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        """
        A C{joined} delta went out for this peer in this channel.
        """

    def member_left(app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        """
        A C{left} delta went out for this peer in this channel.
        """

    def channel_occupied(app_id: str, channel: str) -> None:
        """
        The channel got its first member (told before that member's
        L{member_joined}).
        """

    def channel_vacated(app_id: str, channel: str) -> None:
        """
        The channel's last member left (told after that member's
        L{member_left}).
        """


class IWebhookMarks(Interface):
    """
    Debouncing for the presence webhooks: which peers and channels the
    backend was told are present (their marks), which going-aways wait out
    their grace, and which announcements are under way to an outbox.

    Each announcement is handed to exactly one caller, which stores it in
    its outbox and then confirms it (L{stored}); until then nothing
    contradicting it is announced, so the events of one peer (channel) are
    stored in the order they were decided. An announcement not confirmed
    within the claim time is handed out again by L{due}, with the same id.
    Times are Unix seconds from the caller's clock.
    """

    def arrived(where: Where, now: float, event_id: str) -> Deferred[list[Announcement]]:
        """
        A peer's first connection or a channel's first member: cancels a
        pending going-away; fires with its announcement (id C{event_id})
        when the backend does not know it present.
        """

    def going(where: Where, deadline: float) -> Deferred[None]:
        """
        Its last connection (member) is gone: announce it gone at the
        deadline unless it arrives first. Nothing when it is not marked.
        """

    def due(now: float) -> Deferred[list[Announcement]]:
        """
        Claim the going-aways due by C{now} of things still absent, and the
        announcements whose claim ran out.
        """

    def stored(announcements: Sequence[Announcement], now: float) -> Deferred[list[Announcement]]:
        """
        These announcements are in the outbox. Fires with the arrivals
        that had to wait for a going-away to be stored.
        """

    def restore(marks: Sequence[tuple[Where, float]]) -> Deferred[None]:
        """
        Marks an outbox holds, each with a deadline: those not known here
        (an earlier run's, or lost) are marked and go away at their
        deadline unless they arrive first.
        """


class IWebhookOutbox(Interface):
    """
    The durable queue of webhook events, per app in emission order, and the
    marks of which peers and channels the backend was told are online.

    An event counts as emitted once L{append} has fired.
    """

    def append(events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> Deferred[None]:
        """
        Store events (in this order, after every earlier one) and set or
        clear online marks, in one transaction.
        """

    def pending_apps() -> Deferred[list[str]]:
        """
        Fires with the ids of the apps that have pending events.
        """

    def next_batch(app_id: str, limit: int) -> Deferred[list[StoredEvent]]:
        """
        Fires with at most C{limit} of the app's oldest pending events.
        """

    def delivered(app_id: str, seqs: Sequence[int], at: float) -> Deferred[None]:
        """
        The backend accepted these events: forget them.
        """

    def failed(app_id: str, seqs: Sequence[int], error: str, at: float) -> Deferred[None]:
        """
        These events could not be delivered in the retry time: set them
        aside (L{replay_failed} brings them back).
        """

    def attempted(app_id: str, error: str, at: float) -> Deferred[None]:
        """
        A delivery attempt failed with this error (for the status).
        """

    def replay_failed(app_id: str) -> Deferred[int]:
        """
        Make the app's failed events pending again, in their original order.
        Fires with how many.
        """

    def status(app_id: str) -> Deferred[OutboxStatus]:
        """
        Fires with the app's L{meteredrt.webhooks.outbox.OutboxStatus}.
        """

    def online_marks() -> Deferred[list[OnlineMark]]:
        """
        Fires with every set online mark (all apps).
        """
