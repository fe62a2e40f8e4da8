"""
Tests for L{meteredrt.redisclient}: URL parsing, the pipelined protocol
with its deadline, reconnects with backoff, scripts and pub/sub, in memory
and against a real C{redis-server}.
"""

from __future__ import annotations

import os
from typing import Any

import hiredis
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.redisclient import (
    BACKOFF_CAP,
    MAX_IN_FLIGHT,
    RedisAddress,
    RedisClient,
    RedisError,
    RedisProtocol,
    RedisSubscriber,
    RedisUnavailable,
    Script,
    parse_redis_url,
)
from tests.servers import RedisServer, free_port, redis_binary


class ParseRedisUrlTests(SynchronousTestCase):
    """
    L{parse_redis_url} reads redis:// and rediss:// URLs.
    """

    def test_defaults(self) -> None:
        """
        Port 6379 and database 0 unless the URL says otherwise.
        """
        self.assertEqual(parse_redis_url("redis://localhost"), RedisAddress("localhost"))

    def test_full(self) -> None:
        """
        User, password (percent-decoded), port, database and TLS are read.
        """
        self.assertEqual(
            parse_redis_url("rediss://me:p%40ss@db.example:6380/3"),
            RedisAddress("db.example", 6380, 3, "me", "p@ss", True),
        )

    def test_password_only(self) -> None:
        """
        C{:password@} and C{password@} both mean a password without a user.
        """
        self.assertEqual(parse_redis_url("redis://:pw@h/1").password, "pw")
        self.assertIsNone(parse_redis_url("redis://:pw@h/1").username)
        self.assertEqual(parse_redis_url("redis://pw@h").password, "pw")

    def test_refused(self) -> None:
        """
        Other schemes, no host, a non-numeric database, bad ports and
        queries are refused with a message.
        """
        for url in (
            "http://h",
            "redis://",
            "redis://h/x",
            "redis://h:99999",
            "redis://h/1?x=1",
            "redis://h/99999999",
            "",
        ):
            with self.assertRaises(ValueError, msg=url):
                parse_redis_url(url)

    def test_str_hides_password(self) -> None:
        """
        The address as logged shows no password.
        """
        self.assertNotIn("secret", str(parse_redis_url("redis://:secret@h/2")))


def connected_protocol(clock: Clock, timeout: float = 2.0, **kwargs: Any) -> tuple[RedisProtocol, StringTransport]:
    protocol = RedisProtocol(clock, timeout, **kwargs)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class RedisProtocolTests(SynchronousTestCase):
    """
    L{RedisProtocol} pipelines commands and matches replies in order.
    """

    def test_pipelining(self) -> None:
        """
        Several commands go out at once; replies fire them in order, even
        when they arrive split anywhere.
        """
        clock = Clock()
        protocol, transport = connected_protocol(clock)
        first = protocol.execute("GET", "a")
        second = protocol.execute("INCR", "b")
        third = protocol.execute("GET", "c")
        self.assertEqual(
            transport.value(),
            hiredis.pack_command(("GET", "a"))
            + hiredis.pack_command(("INCR", "b"))
            + hiredis.pack_command(("GET", "c")),
        )
        for byte in b"$1\r\nx\r\n:7\r\n$-1\r\n":
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(self.successResultOf(first), b"x")
        self.assertEqual(self.successResultOf(second), 7)
        self.assertIsNone(self.successResultOf(third))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_error_reply(self) -> None:
        """
        An error reply fails its own command only.
        """
        protocol, _ = connected_protocol(Clock())
        bad = protocol.execute("NOPE")
        good = protocol.execute("PING")
        protocol.dataReceived(b"-ERR unknown command\r\n+PONG\r\n")
        self.assertIn("unknown command", str(self.failureResultOf(bad, RedisError).value))
        self.assertEqual(self.successResultOf(good), b"PONG")

    def test_timeout(self) -> None:
        """
        A command unanswered past the timeout fails every call in flight
        with L{RedisUnavailable} and aborts the connection.
        """
        clock = Clock()
        protocol, transport = connected_protocol(clock, timeout=2.0)
        first = protocol.execute("GET", "a")
        clock.advance(1.5)
        second = protocol.execute("GET", "b")
        protocol.dataReceived(b"$1\r\nx\r\n")
        self.assertEqual(self.successResultOf(first), b"x")
        clock.advance(1.0)
        self.assertNoResult(second)
        clock.advance(1.1)
        self.assertIn("within 2 s", str(self.failureResultOf(second, RedisUnavailable).value))
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(protocol.execute("PING"), RedisUnavailable)

    def test_answering_pipeline_not_cut(self) -> None:
        """
        Calls that wait longer than the timeout behind a pipeline whose
        replies keep coming do not fail: only silence does.
        """
        clock = Clock()
        protocol, transport = connected_protocol(clock, timeout=2.0)
        calls = [protocol.execute("PING") for _ in range(5)]
        for call in calls[:4]:
            clock.advance(1.5)
            protocol.dataReceived(b"+PONG\r\n")
            self.assertEqual(self.successResultOf(call), b"PONG")
        self.assertNoResult(calls[4])  # sent 6 s ago, but Redis answers
        clock.advance(1.9)
        self.assertNoResult(calls[4])
        clock.advance(0.2)
        self.failureResultOf(calls[4], RedisUnavailable)
        self.assertTrue(transport.disconnecting)

    def test_in_flight_bound(self) -> None:
        """
        Past L{MAX_IN_FLIGHT} unanswered commands, more fail at once and
        are not sent.
        """
        protocol, transport = connected_protocol(Clock())
        for _ in range(MAX_IN_FLIGHT):
            protocol.execute("PING")
        sent = len(transport.value())
        self.failureResultOf(protocol.execute("PING"), RedisUnavailable)
        self.assertEqual(len(transport.value()), sent)

    def test_connection_lost(self) -> None:
        """
        Losing the connection fails the calls in flight with
        L{RedisUnavailable} and cancels the watchdog.
        """
        clock = Clock()
        protocol, _ = connected_protocol(clock)
        pending = protocol.execute("GET", "a")
        protocol.connectionLost(None)
        self.failureResultOf(pending, RedisUnavailable)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.successResultOf(protocol.closed)

    def test_garbage(self) -> None:
        """
        Bytes that are not RESP abort the connection and fail the calls.
        """
        protocol, transport = connected_protocol(Clock())
        pending = protocol.execute("GET", "a")
        protocol.dataReceived(b"!!!garbage\r\n")
        self.failureResultOf(pending, RedisUnavailable)
        self.assertTrue(transport.disconnecting)

    def test_unasked_reply(self) -> None:
        """
        A reply nobody asked for aborts the connection.
        """
        protocol, transport = connected_protocol(Clock())
        protocol.dataReceived(b"+OK\r\n")
        self.assertTrue(transport.disconnecting)

    def test_push(self) -> None:
        """
        With C{on_push}, pub/sub messages go there and confirmations answer
        commands.
        """
        pushed: list[list[Any]] = []
        protocol, _ = connected_protocol(Clock(), on_push=pushed.append)
        confirmed = protocol.execute("SUBSCRIBE", "a")
        protocol.dataReceived(
            b"*3\r\n$7\r\nmessage\r\n$1\r\nz\r\n$1\r\n1\r\n"
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
            b"*4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$2\r\nab\r\n$1\r\n2\r\n"
        )
        self.assertEqual(self.successResultOf(confirmed), [b"subscribe", b"a", 1])
        self.assertEqual(pushed, [[b"message", b"z", b"1"], [b"pmessage", b"a*", b"ab", b"2"]])


class FakeEndpoint:
    """
    A client endpoint that hands out in-memory connections, or refuses.
    """

    def __init__(self) -> None:
        self.refuse = False
        self.attempts = 0
        self.transports: list[StringTransport] = []
        self.protocols: list[RedisProtocol] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError())
            return d
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


class ConnectorTests(SynchronousTestCase):
    """
    L{RedisClient} logs in, reconnects with backoff and fails fast while
    down.
    """

    def make(self, url: str = "redis://:pw@h/2") -> tuple[RedisClient, FakeEndpoint, Clock]:
        clock = Clock()
        endpoint = FakeEndpoint()
        client = RedisClient(clock, parse_redis_url(url), endpoint=endpoint, jitter=lambda: 1.0)
        return client, endpoint, clock

    def test_login(self) -> None:
        """
        AUTH and SELECT go out first; the client is connected once they
        succeed.
        """
        client, endpoint, _ = self.make("redis://me:pw@h/2")
        client.startService()
        self.assertEqual(
            endpoint.transports[0].value(),
            hiredis.pack_command(("AUTH", "me", "pw")) + hiredis.pack_command(("SELECT", 2)),
        )
        self.assertFalse(client.connected)
        self.failureResultOf(client.execute("PING"), RedisUnavailable)
        endpoint.protocols[0].dataReceived(b"+OK\r\n+OK\r\n")
        self.assertTrue(client.connected)
        self.successResultOf(client.ready)

    def test_login_refused(self) -> None:
        """
        A wrong password drops the connection and retries later.
        """
        client, endpoint, clock = self.make()
        client.startService()
        endpoint.protocols[0].dataReceived(b"-WRONGPASS bad\r\n+OK\r\n")
        self.assertTrue(endpoint.transports[0].disconnecting)
        self.assertFalse(client.connected)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_backoff(self) -> None:
        """
        Refused connects are retried after doubling delays, capped.
        """
        client, endpoint, clock = self.make()
        endpoint.refuse = True
        client.startService()
        delays = []
        for _ in range(10):
            (call,) = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual([round(d, 6) for d in delays[:4]], [0.1, 0.2, 0.4, 0.8])
        self.assertEqual(delays[-1], BACKOFF_CAP)
        self.assertEqual(endpoint.attempts, 11)
        client.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_jitter(self) -> None:
        """
        The delay is scaled by a random factor between 0.5 and 1.
        """
        client = RedisClient(Clock(), RedisAddress("h"), endpoint=FakeEndpoint(), jitter=lambda: 0.0)
        self.assertAlmostEqual(client.backoff(3), 0.4)

    def test_reconnect_hook_and_scripts(self) -> None:
        """
        After a lost connection the client reconnects, loads its scripts
        again before use, and calls the reconnect hooks.
        """
        client, endpoint, clock = self.make("redis://h")
        script = client.register(Script("return 1"))
        hooked: list[bool] = []
        client.on_reconnected(lambda: hooked.append(True))
        client.startService()
        endpoint.protocols[0].dataReceived(b"$40\r\n" + script.sha + b"\r\n")
        self.assertTrue(client.connected)
        self.assertEqual(hooked, [])
        endpoint.protocols[0].connectionLost(None)
        self.assertFalse(client.connected)
        clock.advance(0.1)
        self.assertEqual(endpoint.transports[1].value(), hiredis.pack_command(("SCRIPT", "LOAD", script.source)))
        endpoint.protocols[1].dataReceived(b"$40\r\n" + script.sha + b"\r\n")
        self.assertEqual(hooked, [True])

    def test_keepalive(self) -> None:
        """
        With a keepalive, an idle connection is pinged; one whose PING goes
        unanswered is dropped and reconnected, and pinging stops with it.
        """
        clock = Clock()
        endpoint = FakeEndpoint()
        subscriber = RedisSubscriber(
            clock, RedisAddress("h"), lambda c, d, p: None, endpoint=endpoint, jitter=lambda: 1.0
        )
        subscriber.startService()
        self.assertTrue(subscriber.connected)
        clock.advance(5.0)
        self.assertEqual(endpoint.transports[0].value(), hiredis.pack_command(("PING",)))
        endpoint.protocols[0].dataReceived(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        clock.advance(5.0)
        clock.advance(2.0)  # the second PING goes unanswered
        self.assertTrue(endpoint.transports[0].disconnecting)
        endpoint.protocols[0].connectionLost(None)
        self.assertFalse(subscriber.connected)
        clock.advance(0.1)
        self.assertTrue(subscriber.connected)
        subscriber.stopService()
        endpoint.protocols[1].connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_tls(self) -> None:
        """
        C{rediss://} connects through TLS to the URL's host and port;
        C{redis://} does not.
        """
        reactor = MemoryReactorClock()
        for url, tls in (("rediss://example.com:6380/0", True), ("redis://example.com:6380/0", False)):
            client = RedisClient(reactor, parse_redis_url(url))
            client.startService()
            _, port, factory, _, _ = reactor.tcpClients[-1]
            self.assertEqual(port, 6380)
            self.assertEqual(isinstance(factory._wrappedFactory, TLSMemoryBIOFactory), tls, url)
            client.stopService()

    def test_noscript_fallback(self) -> None:
        """
        C{NOSCRIPT} makes L{RedisClient.run} send the script itself.
        """
        client, endpoint, _ = self.make("redis://h")
        client.startService()
        script = Script("return 1")
        result = client.run(script, ["k"], ["a"])
        endpoint.protocols[0].dataReceived(b"-NOSCRIPT No matching script\r\n:1\r\n")
        self.assertEqual(self.successResultOf(result), 1)
        self.assertTrue(
            endpoint.transports[0].value().endswith(hiredis.pack_command(("EVAL", script.source, 1, "k", "a")))
        )


class RealRedisTests(TestCase):
    """
    The client against a real C{redis-server}.
    """

    async def start(self, url_suffix: str = "") -> tuple[RedisServer, RedisClient]:
        self.server = await RedisServer.start(self)
        client = RedisClient(reactor, parse_redis_url(self.server.url + url_suffix), timeout=5.0)
        client.startService()
        self.addCleanup(client.stopService)
        await client.ready
        return self.server, client

    async def test_commands_and_scripts(self) -> None:
        """
        Pipelined commands, a script by EVALSHA, and one after SCRIPT FLUSH.
        """
        _, client = await self.start()
        script = client.register(Script("return redis.call('INCRBY', KEYS[1], ARGV[1])"))
        results = [client.execute("INCR", "n") for _ in range(100)]
        self.assertEqual([await r for r in results], list(range(1, 101)))
        self.assertEqual(await client.run(script, ["n"], [5]), 105)
        await client.execute("SCRIPT", "FLUSH")
        self.assertEqual(await client.run(script, ["n"], [5]), 110)
        with self.assertRaises(RedisError):
            await client.execute("NOPE")

    async def test_pubsub_and_restart(self) -> None:
        """
        Messages reach the subscriber in order; after Redis restarts empty
        the subscriber comes back, subscribed again, and the hooks run.
        """
        server, client = await self.start()
        got: list[tuple[bytes, bytes, bytes | None]] = []
        sub = RedisSubscriber(reactor, parse_redis_url(server.url), lambda c, d, p: got.append((c, d, p)), timeout=5.0)
        sub.startService()
        self.addCleanup(sub.stopService)
        await sub.ready
        await sub.subscribe(b"a")
        await sub.psubscribe(b"a*")
        for i in range(3):
            client.execute("PUBLISH", "a", str(i))
        await client.execute("PING")
        await sub.unsubscribe(b"a")
        await client.execute("PUBLISH", "ab", "x")
        await sub.punsubscribe(b"a*")
        self.assertEqual(
            got,
            [(b"a", b"0", None), (b"a", b"0", b"a*"), (b"a", b"1", None), (b"a", b"1", b"a*"),
             (b"a", b"2", None), (b"a", b"2", b"a*"), (b"ab", b"x", b"a*")],
        )  # fmt: skip
        await sub.subscribe(b"b")
        reconnected: Deferred[None] = Deferred()
        sub.on_reconnected(lambda: reconnected.callback(None))
        await server.restart()
        await reconnected
        for _ in range(100):
            if client.connected:
                break
            await deferLater(reactor, 0.05, lambda: None)
        got.clear()
        await client.execute("PUBLISH", "b", "again")
        await client.execute("PING")
        await sub.psubscribe(b"zz")  # a round trip on the subscriber
        self.assertEqual(got, [(b"b", b"again", None)])

    async def test_password_and_db(self) -> None:
        """
        AUTH with the URL's password and SELECT of its database.
        """
        server, client = await self.start()
        await client.execute("CONFIG", "SET", "requirepass", "s3cret")
        second = RedisClient(reactor, parse_redis_url(f"redis://:s3cret@127.0.0.1:{server.port}/4"), timeout=5.0)
        second.startService()
        self.addCleanup(second.stopService)
        await second.ready
        await second.execute("SET", "k", "v")
        self.assertIsNone(await client.execute("GET", "k"))
        self.assertEqual(await client.execute("SELECT", 4), b"OK")
        self.assertEqual(await client.execute("GET", "k"), b"v")
        wrong = RedisClient(reactor, parse_redis_url(f"redis://:nope@127.0.0.1:{server.port}/0"), timeout=5.0)
        wrong.startService()
        self.addCleanup(wrong.stopService)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(wrong.connected)
        self.assertNoResult(wrong.ready)


def make_certificates(directory: str) -> bytes:
    """
    Write a CA and a server key and certificate for C{localhost} signed by
    it into C{directory}; return the CA certificate (PEM).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meteredrt test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    for name, data in (
        ("ca.pem", ca_pem),
        ("server.pem", cert.public_bytes(pem)),
        (
            "server.key",
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ),
    ):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return ca_pem


class _Exits(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class TlsTests(TestCase):
    """
    C{rediss://} against a real C{redis-server} serving TLS only.
    """

    async def test_rediss(self) -> None:
        """
        The client verifies the server against the given CA and the URL's
        host, then works as over TCP; a client that does not trust the CA
        never connects.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca_pem = make_certificates(directory)
        port = free_port()
        exits = _Exits()
        process = reactor.spawnProcess(
            exits,
            redis_binary(),
            [
                "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
                "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no",
                "--save", "", "--appendonly", "no", "--dir", directory,
            ],
            path=directory,
        )  # fmt: skip

        async def stop() -> None:
            try:
                process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
            await exits.ended

        self.addCleanup(stop)
        trusted = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca_pem))
        client = RedisClient(reactor, parse_redis_url(f"rediss://localhost:{port}/0"), timeout=5.0, tls=trusted)
        client.startService()
        self.addCleanup(client.stopService)
        await client.ready.addTimeout(15, reactor)
        self.assertEqual(await client.execute("SET", "k", "v"), b"OK")
        self.assertEqual(await client.execute("GET", "k"), b"v")
        doubter = RedisClient(reactor, parse_redis_url(f"rediss://localhost:{port}/0"), timeout=5.0)
        doubter.startService()
        self.addCleanup(doubter.stopService)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(doubter.connected)
        self.flushLoggedErrors()


class CallMetricsTests(SynchronousTestCase):
    """
    The client counts each call's round trip, or its failure, by command.
    """

    def test_recorded(self) -> None:
        """
        An answered call is one observation of its round trip; an error
        reply and a call without a connection are failures.
        """
        from meteredrt.metrics import Metrics

        clock = Clock()
        endpoint = FakeEndpoint()
        client = RedisClient(clock, parse_redis_url("redis://h"), endpoint=endpoint, jitter=lambda: 1.0)
        metrics = client.metrics = Metrics()
        self.assertEqual(len(self.failureResultOf(client.execute("PING")).value.args), 1)
        self.assertEqual(metrics.redis_errors["PING"], 1)
        client.startService()
        self.addCleanup(client.stopService)
        protocol = endpoint.protocols[0]
        answered = client.execute(b"publish", "c", "m")
        clock.advance(0.003)
        protocol.dataReceived(b":1\r\n")
        self.assertEqual(self.successResultOf(answered), 1)
        histogram = metrics.redis_call_seconds["PUBLISH"]
        self.assertEqual(histogram.count, 1)
        self.assertAlmostEqual(histogram.sum, 0.003)
        refused = client.execute("GET", "k")
        protocol.dataReceived(b"-ERR wrong\r\n")
        self.failureResultOf(refused)
        self.assertEqual(metrics.redis_errors["GET"], 1)
        self.assertNotIn("GET", metrics.redis_call_seconds)
