"""TLS: mqtts, wss and HTTPS from a certificate made here, signed by a CA made here."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mqchat.config import Settings, TlsSettings
from mqchat.runner import RunningServer, run_server
from tests.support.accounts import sign_up


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(CA cert, server cert, server key) as PEM files; the server cert is for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("mqchat test CA"))
        .issuer_name(_name("mqchat test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return tmp_path / "ca.pem"


@pytest.fixture
async def tls_server(settings: Settings, tmp_path: Path) -> AsyncIterator[RunningServer]:
    _, certfile, keyfile = make_ca_and_server_cert(tmp_path)
    tls = TlsSettings(certfile=certfile, keyfile=keyfile, mqtts_port=0, wss_port=0, https_port=0, plain_listeners=False)
    async with run_server(settings.model_copy(update={"tls": tls})) as running:
        yield running


def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def test_chat_over_mqtts_wss_and_https_only(tls_server: RunningServer, ca_file: Path) -> None:
    server = tls_server
    assert (server.mqtt_port, server.ws_port, server.http_port) == (None, None, None)  # plain ones are off
    context = client_context(ca_file)
    async with httpx.AsyncClient(base_url=f"https://localhost:{server.https_port}", verify=context) as http:
        tokens = {}
        for user in ("alice", "bob"):
            tokens[user] = await sign_up(http, user)
    alice = aiomqtt.Client(
        "127.0.0.1", server.mqtts_port or 0, identifier="alice:phone", username="alice",
        password=tokens["alice"], tls_context=context,
    )  # fmt: skip
    bob = aiomqtt.Client(
        "localhost", server.wss_port or 0, identifier="bob:browser", username="bob", password=tokens["bob"],
        tls_context=context, transport="websockets", websocket_path="/mqtt",
    )  # fmt: skip
    async with alice, bob:
        await bob.subscribe("chat/user/bob", qos=1)
        message = {"type": "send_message", "client_msg_id": "t-1", "to_user": "bob", "content": "over TLS"}
        await alice.publish("chat/in/alice/phone", json.dumps(message), qos=1)
        async with asyncio.timeout(10):
            async for received in bob.messages:
                event = json.loads(bytes(received.payload))  # type: ignore[arg-type]
                if event["type"] == "new_message":
                    assert event["content"] == "over TLS" and event["from_user"] == "alice"
                    break


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: RunningServer) -> None:
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=f"https://localhost:{tls_server.https_port}") as http:
            await http.get("/healthz")
    for port in (tls_server.mqtts_port, tls_server.wss_port):
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("localhost", port, ssl=ssl.create_default_context())


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        TlsSettings(certfile=tmp_path / "a.pem")
    with pytest.raises(ValueError, match="plain_listeners"):
        TlsSettings(plain_listeners=False)
