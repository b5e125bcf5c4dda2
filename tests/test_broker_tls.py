"""TLS: the embedded broker serves TLS from the deployment and BusClient.for_deployment
verifies it against the configured CA (a self-signed certificate for 127.0.0.1 here)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ciphertwin.broker.embedded import EmbeddedBroker, free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.errors import BusUnavailable
from ciphertwin.config import Principal, load_deployment


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciphertwin-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "broker.pem", tmp / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_listener_and_verified_client(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    env = {
        "CIPHERTWIN_BROKER__PORT": str(free_port()),
        "CIPHERTWIN_BROKER__TLS__ENABLED": "true",
        "CIPHERTWIN_BROKER__TLS__CAFILE": str(cert),
        "CIPHERTWIN_BROKER__TLS__CERTFILE": str(cert),
        "CIPHERTWIN_BROKER__TLS__KEYFILE": str(key),
        "CIPHERTWIN_PRINCIPALS__CREDENTIALS_FILE": str(tmp_path / "clients.json"),
    }
    d = load_deployment(None, env=env)
    d.credentials().add(Principal.create("cloud", "cloud", "pw-cloud-123", iterations=1000))
    async with EmbeddedBroker(d):
        async with BusClient.for_deployment(d, client_id="cloud", username="cloud",
                                            password="pw-cloud-123", connect_timeout=5) as c:
            await c.publish(c.topics.job_submit(), b"over tls")
        # a client that does not trust the CA never gets a connection
        plain = load_deployment(None, env={k: v for k, v in env.items() if "CAFILE" not in k})
        with pytest.raises(BusUnavailable):
            async with BusClient.for_deployment(plain, client_id="cloud", username="cloud",
                                                password="pw-cloud-123", connect_timeout=1.0):
                pass
