"""``edge-agent certs``: the agent's OPC UA application certificate and key.

That the files it writes connect to a secured PLC is shown by tests/test_opcua_security.py, whose
agent certificate this command makes. Here: what is in them, how they are written, and the
refusals (an existing key, bad arguments: exit 2).
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from asyncua.crypto import uacrypto
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_agent import certs, cli

AGENT = "line1-edge"


def make(out: Path, *extra: str) -> int:
    return cli.main(["certs", "--out", str(out), "--agent-id", AGENT, *extra])


def test_certs_writes_a_certificate_and_key_asyncua_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    code = make(out, "--hostname", "line1-pc", "--ip", "10.1.2.3", "--days", "400")
    assert code == 0
    cert_path, key_path = out / certs.CERTIFICATE_FILE, out / certs.KEY_FILE
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == [certs.CERTIFICATE_FILE, certs.KEY_FILE]

    # what the agent's OPC UA client loads (asyncua's own loaders, as in set_security)
    certificate = asyncio.run(uacrypto.load_certificate(cert_path))
    key = asyncio.run(uacrypto.load_private_key(key_path))
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert certs.key_matches(certificate, key)
    assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)
    # the ApplicationUri the agent sends must be in the certificate, or servers refuse it;
    # asyncua's check says so in its log (it returns True when something is wrong)
    uri = "urn:line1-pc:edge-agent:line1-edge"
    assert certs.application_uri(certificate) == uri
    assert not uacrypto.check_certificate(certificate, uri, "line1-pc")
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["line1-pc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    valid = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert valid.days == 400

    shown = capsys.readouterr().out
    assert certs.thumbprint(certificate, "sha1") in shown
    assert certs.thumbprint(certificate, "sha256") in shown
    assert "trusted client certificates" in shown  # what to do next
    assert f'private_key = "{key_path.resolve()}"' in shown


def test_a_bigger_key_on_request(tmp_path: Path) -> None:
    assert make(tmp_path, "--key-size", "3072") == 0
    key = certs.read_private_key(tmp_path / certs.KEY_FILE)
    assert key.key_size == 3072


def test_certs_never_replaces_a_key_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert make(tmp_path) == 0
    cert_path, key_path = tmp_path / certs.CERTIFICATE_FILE, tmp_path / certs.KEY_FILE
    before = (cert_path.read_bytes(), key_path.read_bytes())
    capsys.readouterr()

    assert make(tmp_path) == 2
    err = capsys.readouterr().err
    assert "exist already: not replaced" in err
    assert "--force" in err
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before

    key_path.unlink()  # a certificate alone is not replaced either (its key may be elsewhere)
    assert make(tmp_path) == 2
    assert cert_path.read_bytes() == before[0]

    assert make(tmp_path, "--force") == 0
    after = (cert_path.read_bytes(), key_path.read_bytes())
    assert after[0] != before[0]
    assert after[1] != before[1]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert certs.key_matches(certs.read_certificate(cert_path), certs.read_private_key(key_path))
    assert not list(tmp_path.glob(".*.new"))  # nothing half-written left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--days", "0"], "--days: 1 to 7300"),
        (["--days", "7301"], "--days: 1 to 7300"),
        (["--days", "x"], "invalid int value"),
        (["--key-size", "1024"], "invalid choice"),
        (["--agent-id", "line 1"], "--agent-id: letters, digits"),
        (["--hostname", "bad_host!"], "--hostname: not a DNS host name"),
        (["--ip", "10.0.0.256"], "not an IP address"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "pki"
    assert exit_code(["certs", "--out", str(out), "--agent-id", AGENT, *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_without_out_or_agent_id_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["certs", "--agent-id", AGENT]) == 2
    assert exit_code(["certs", "--out", "x"]) == 2
    assert "required" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int | str | None:
    """What the process would exit with: argparse exits itself, the command returns."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code
