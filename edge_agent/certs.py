"""The agent's OPC UA application certificate: creating it (``edge-agent certs``), and reading
the certificates and keys a configuration names.

OPC UA authenticates applications, not hosts: the agent signs (and encrypts) with its own
*application instance certificate*, which the PLC must trust, and the agent trusts exactly one
PLC certificate per source, pinned in its configuration. This module holds the pieces with no
I/O beyond reading and writing those files:

- :func:`read_certificate`, :func:`read_private_key`: PEM or DER, with errors a person can act on
  (``ValueError`` naming what is wrong, never the content of a key).
- :func:`thumbprint`: the SHA-1 (what PLC engineering tools show) or SHA-256 of the DER bytes.
- :func:`create`: a self-signed application certificate as OPC UA wants it (OPC 10000-6 §6.2.2):
  RSA 2048 to 4096 bits, signed with SHA-256, the ApplicationUri as a URI subjectAltName (a
  server refuses a client whose certificate does not carry the ApplicationUri it sends), the
  host name as a DNS subjectAltName, client and server authentication as extended key usage.
- :func:`write_pair`: the certificate (DER, the form PLCs import) and the key (PKCS#8 PEM,
  mode 0600), each written whole or not at all; an existing key is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Literal

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from rich.console import Console
from rich.table import Table

#: Basic256Sha256 allows RSA keys of 2048 to 4096 bits (OPC 10000-7, its security policy)
MIN_KEY_BITS: Final = 2048
MAX_KEY_BITS: Final = 4096
KEY_SIZES: Final = (2048, 3072, 4096)
#: the longest validity ``edge-agent certs`` issues (20 years)
MAX_DAYS: Final = 7300
DEFAULT_DAYS: Final = 1095

CERTIFICATE_FILE: Final = "agent-cert.der"
KEY_FILE: Final = "agent-key.pem"

_AGENT_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOST_NAME: Final = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)

Hash = Literal["sha1", "sha256"]


# ------------------------------------------------------------------------------------- reading


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def read_certificate(path: Path) -> x509.Certificate:
    """An X.509 certificate from a PEM or DER file; ValueError says why it is not one."""
    data = _read(path, "certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{str(path)!r} is not an X.509 certificate (PEM or DER)") from None


def read_private_key(path: Path, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """An RSA private key from a PEM or DER file (PKCS#8 or PKCS#1, encrypted when ``password``
    is given); ValueError says why it cannot be used, never what it holds."""
    data = _read(path, "private key")
    pem = data.lstrip().startswith(b"-----BEGIN")
    load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        key = load(data, password=password)
    except TypeError:
        # cryptography says TypeError both for "encrypted, no password" and the reverse
        if password is None:
            raise ValueError(f"{str(path)!r} is encrypted: give private_key_password") from None
        raise ValueError(
            f"{str(path)!r} is not encrypted, but a private_key_password is given"
        ) from None
    except ValueError:
        hint = " (or the private_key_password is wrong)" if password is not None else ""
        raise ValueError(f"{str(path)!r} is not a private key in PEM or DER{hint}") from None
    except Exception:  # cryptography raises its own types for unsupported algorithms
        raise ValueError(f"{str(path)!r} is not a private key the agent can use") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"{str(path)!r} is not an RSA key: OPC UA's Basic256Sha256 signs and encrypts with RSA"
        )
    return key


def rsa_public_key(certificate: x509.Certificate) -> rsa.RSAPublicKey:
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA certificate: OPC UA's Basic256Sha256 signs with RSA")
    return key


def check_key_size(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> None:
    if not MIN_KEY_BITS <= key.key_size <= MAX_KEY_BITS:
        raise ValueError(
            f"an RSA key of {key.key_size} bits: Basic256Sha256 needs {MIN_KEY_BITS} to "
            f"{MAX_KEY_BITS} bits"
        )


def key_matches(certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    """The key is the private half of the certificate's public key."""
    public = certificate.public_key()
    return isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == (
        key.public_key().public_numbers()
    )


def application_uri(certificate: x509.Certificate) -> str | None:
    """The certificate's ApplicationUri: its (first) URI subjectAltName, if it has one."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def thumbprint(certificate: x509.Certificate | bytes, algorithm: Hash = "sha1") -> str:
    """Upper-case hex digest of the DER bytes, as PLC tools and UaExpert show it."""
    data = certificate if isinstance(certificate, bytes) else der(certificate)
    return hashlib.new(algorithm, data).hexdigest().upper()


def first_certificate(chain: bytes) -> bytes:
    """The first DER certificate of a chain sent as one byte string (OPC UA sends a server's
    certificate chain concatenated)."""
    if len(chain) < 2 or chain[0] != 0x30:  # an ASN.1 SEQUENCE
        return chain
    length = chain[1]
    if length < 0x80:
        return chain[: 2 + length]
    count = length & 0x7F
    if count == 0 or len(chain) < 2 + count:
        return chain
    return chain[: 2 + count + int.from_bytes(chain[2 : 2 + count], "big")]


# ------------------------------------------------------------------------------------ creating


def agent_application_uri(agent_id: str, hostname: str) -> str:
    """The agent's ApplicationUri: unique per agent and machine."""
    return f"urn:{hostname}:edge-agent:{agent_id}"


def check_agent_id(value: str) -> str:
    if not _AGENT_ID.fullmatch(value):
        raise ValueError(
            f"--agent-id: letters, digits, '_', '.' or '-', starting with a letter or digit, "
            f"as [agent] id in the configuration (got {value!r})"
        )
    return value


def check_host_name(value: str) -> str:
    if len(value) > 253 or not _HOST_NAME.fullmatch(value):
        raise ValueError(f"--hostname: not a DNS host name (got {value!r})")
    return value


@dataclass(frozen=True, slots=True)
class Created:
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def application_uri(self) -> str:
        uri = application_uri(self.certificate)
        assert uri is not None
        return uri


def create(
    *,
    application_uri: str,
    common_name: str,
    hostname: str,
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (),
    days: int = DEFAULT_DAYS,
    key_size: int = 2048,
    organization: str | None = None,
) -> Created:
    """A new RSA key and a self-signed OPC UA application instance certificate for it."""
    if key_size not in KEY_SIZES:
        raise ValueError(f"key size must be one of {', '.join(map(str, KEY_SIZES))}")
    if days < 1:
        raise ValueError("a certificate must be valid for at least 1 day")
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri),
        x509.DNSName(hostname),
        *(x509.IPAddress(ip) for ip in ips),
    ]
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        common_name,
        {"organizationName": organization} if organization else {},
        names,
        # client and server authentication, as the OPC Foundation's stacks issue them
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        days=days,
    )
    return Created(certificate, key)


@dataclass(frozen=True, slots=True)
class Written:
    certificate: Path
    key: Path


class ExistsError(ValueError):
    """The files are there already and replacing them was not asked for."""


def write_pair(
    directory: Path,
    created: Created,
    *,
    force: bool = False,
    names: tuple[str, str] = (CERTIFICATE_FILE, KEY_FILE),
) -> Written:
    """Write the certificate (DER) and key (PKCS#8 PEM, mode 0600) into ``directory``, named
    ``names`` (certificate, key).

    Refuses (:class:`ExistsError`) when either file exists, unless ``force``: a replaced key
    means a new certificate the PLC does not trust yet.
    """
    cert_path, key_path = directory / names[0], directory / names[1]
    existing = [str(p) for p in (key_path, cert_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise ExistsError(
            f"{' and '.join(existing)} exist already: not replaced (--force replaces them; the "
            "PLC must then be given the new certificate to trust)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = created.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    staged_key = _stage(key_path, key_pem, 0o600)
    try:
        staged_cert = _stage(cert_path, der(created.certificate), 0o644)
    except BaseException:
        staged_key.unlink(missing_ok=True)
        raise
    os.replace(staged_key, key_path)
    os.replace(staged_cert, cert_path)
    _sync_directory(directory)
    return Written(cert_path, key_path)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file beside ``path``, with ``mode`` from its creation (a key is never
    readable by others, not even for a moment), flushed to disk."""
    staged = path.with_name(f".{path.name}.new")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        staged.unlink(missing_ok=True)
        raise
    os.close(fd)
    return staged


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def validity(certificate: x509.Certificate) -> tuple[datetime, datetime]:
    return certificate.not_valid_before_utc, certificate.not_valid_after_utc


# ----------------------------------------------------------------------------- the command


def run_certs(
    out: Console,
    directory: Path,
    agent_id: str,
    hostname: str,
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...],
    days: int,
    key_size: int,
    force: bool,
) -> Written:
    """``edge-agent certs``: create the agent's application certificate and key in
    ``directory`` and say what to do with them. ValueError (or :class:`ExistsError`) on bad
    input, before anything is written."""
    check_agent_id(agent_id)
    check_host_name(hostname)
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days: 1 to {MAX_DAYS} (got {days})")
    created = create(
        application_uri=agent_application_uri(agent_id, hostname),
        common_name=f"edge-agent {agent_id}",
        hostname=hostname,
        ips=ips,
        days=days,
        key_size=key_size,
    )
    written = write_pair(directory, created, force=force)
    certificate = created.certificate
    table = Table(title="OPC UA application certificate of the agent", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("certificate", f"{written.certificate} (DER: give this file to the PLC)")
    table.add_row("private key", f"{written.key} (mode 0600: never leaves this machine)")
    table.add_row("ApplicationUri", created.application_uri)
    table.add_row("subject", certificate.subject.rfc4514_string())
    hosts = [hostname, *(str(ip) for ip in ips)]
    table.add_row("host names", ", ".join(hosts))
    table.add_row("key", f"RSA {key_size} bits, signed with SHA-256")
    before, after = validity(certificate)
    table.add_row("valid", f"{before:%Y-%m-%d} to {after:%Y-%m-%d} ({days} days)")
    out.print(table)
    # below the table, each on one line: a thumbprint is compared whole, never wrapped
    out.print(f"SHA-1 thumbprint    {thumbprint(certificate, 'sha1')}", markup=False)
    out.print(f"SHA-256 thumbprint  {thumbprint(certificate, 'sha256')}", markup=False)
    out.print(
        "Next:\n"
        f"  1. Add {written.certificate.name} to the PLC's trusted client certificates (its OPC "
        "UA server's certificate manager) and check there that the SHA-1 thumbprint is the one "
        "above.\n"
        "  2. Export the PLC's own OPC UA server certificate, put it beside the configuration "
        "and compare its thumbprint with the one the PLC shows: the agent connects only to the "
        "PLC presenting exactly this certificate.\n"
        "  3. In each OPC UA source of the configuration:\n\n"
        "       [sources.security]\n"
        '       policy = "Basic256Sha256"\n'
        '       mode = "SignAndEncrypt"\n'
        f'       certificate = "{written.certificate.resolve()}"\n'
        f'       private_key = "{written.key.resolve()}"\n'
        '       server_certificate = "plc-cert.der"   # step 2\n'
        '       # username = "..." and password = { file = "..." } if the PLC asks for a user\n\n'
        "  4. edge-agent validate CONFIG.toml",
        markup=False,
        highlight=False,
    )
    return written
