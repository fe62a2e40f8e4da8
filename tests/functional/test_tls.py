"""
C{--listen ssl:…} serves C{wss://}: the whole connection path, including the
slow-reader producer that the adapter registers on the TLS transport.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meteredrt.tap import Options, makeService

from .support import CONFIG, PUBLISHABLE_KEY


def write_self_signed(directory: str) -> tuple[str, str]:
    """
    A throw-away key and certificate for 127.0.0.1, as PEM files.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class _Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.counted_while_open = self.factory.cap.counts.count("127.0.0.1")
        self.sendMessage(json.dumps({"type": "subscribe", "channel": "room", "requestId": "s"}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.frames.append(json.loads(payload))
        if len(self.factory.frames) == 3:
            self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed.callback(code)


class TLSTests(TestCase):
    """
    A TLS listener from an endpoint string.
    """

    async def test_wss(self) -> None:
        """
        A client connects over TLS with a publishable key, is welcomed,
        subscribes and gets its ack and snapshot.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        key_path, cert_path = write_self_signed(base)
        config_path = os.path.join(base, "meteredrt.toml")
        with open(config_path, "w") as f:
            f.write(CONFIG)
        options = Options()
        options.parseOptions(
            [
                "--config", config_path,
                "--data-dir", os.path.join(base, "data"),
                "--listen", f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
            ]
        )  # fmt: skip
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [port] = await service.getServiceNamed("listeners").listening

        factory = WebSocketClientFactory(f"wss://127.0.0.1:{port.getHost().port}/v1?key={PUBLISHABLE_KEY}")
        factory.protocol = _Client
        factory.frames = []
        factory.closed = Deferred()
        # The per-client connection cap, under the TLS layer.
        factory.cap = port.factory.wrappedFactory
        with open(cert_path, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        connectWS(factory, ssl.optionsForClientTLS("127.0.0.1", trustRoot=authority))
        code = await factory.closed

        self.assertEqual([frame["type"] for frame in factory.frames], ["welcome", "ack", "presence"])
        self.assertIsNone(factory.frames[0]["expiresAt"])
        self.assertEqual(code, 1000)
        # The upgraded connection was counted, and is released when it closes.
        self.assertEqual(factory.counted_while_open, 1)
        for _ in range(40):
            if factory.cap.counts.count("127.0.0.1") == 0:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(factory.cap.counts.count("127.0.0.1"), 0)
