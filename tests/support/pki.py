"""A throw-away PKI for the TLS tests, made with ``cryptography``.

A plant CA signs the broker's certificate (for 127.0.0.1 and localhost), a broker certificate
for another name, and the agent's client certificate; a second, "rogue" CA signs a client
certificate of its own and stands for every CA the agent must not trust. EC P-256 keys: made in
milliseconds, so one PKI per test session costs nothing worth caching across sessions.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    ca: Path  # the plant CA's certificate: what the agent trusts
    server_cert: Path  # signed by the plant CA for 127.0.0.1 and localhost
    server_key: Path
    other_name_cert: Path  # signed by the plant CA for mqtt.elsewhere.example only
    other_name_key: Path
    client_cert: Path  # the agent's, signed by the plant CA, CN = the agent id
    client_key: Path
    client_key_encrypted: Path  # the same key, encrypted with ``key_password``
    key_password: bytes
    rogue_ca: Path  # a CA that signed nothing the broker presents
    rogue_client_cert: Path  # signed by the rogue CA, CN = the agent id
    rogue_client_key: Path


_NOW = dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - dt.timedelta(days=1))
        .not_valid_after(_NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    server_names: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - dt.timedelta(days=1))
        .not_valid_after(_NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(server_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path, agent_id: str) -> Pki:
    """Write the CAs, certificates and keys (PEM) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    password = b"key-password-for-tests"
    plant = _ca("plant CA")
    rogue = _ca("rogue CA")
    loopback: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    pairs = {
        "server": _leaf(plant, "broker", server_names=loopback),
        "other-name": _leaf(
            plant, "elsewhere", server_names=[x509.DNSName("mqtt.elsewhere.example")]
        ),
        "client": _leaf(plant, agent_id),
        "rogue-client": _leaf(rogue, agent_id),
    }
    for name, (cert, key) in pairs.items():
        _write_cert(directory / f"{name}.crt", cert)
        _write_key(directory / f"{name}.key", key)
    _write_key(directory / "client-encrypted.key", pairs["client"][1], password)
    _write_cert(directory / "ca.crt", plant[0])
    _write_cert(directory / "rogue-ca.crt", rogue[0])
    d = directory
    return Pki(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        other_name_cert=d / "other-name.crt",
        other_name_key=d / "other-name.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        client_key_encrypted=d / "client-encrypted.key",
        key_password=password,
        rogue_ca=d / "rogue-ca.crt",
        rogue_client_cert=d / "rogue-client.crt",
        rogue_client_key=d / "rogue-client.key",
    )
