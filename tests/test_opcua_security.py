"""OPC UA security, against the line PLC simulator secured the way a real PLC is.

The secured PLC offers only Basic256Sha256 (Sign, SignAndEncrypt), presents its own certificate,
opens a session only for the client certificate it trusts and only for its user with the right
password. Each test names the protection it checks; each fails when that protection is removed
(the agent's, or the PLC's where the agent's part is to say clearly why it was refused).

The certificates are made once per session (the agent's by ``edge-agent certs``, as on a line
PC); the two PLCs (secured, unsecured) are shared by the module's tests: starting an asyncua
server costs about 2 s, a secured handshake much less.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from asyncua import ua
from asyncua.crypto import security_policies

from edge_agent import certs, cli
from edge_agent.config import Config, OpcUaSecurity
from edge_agent.errors import ConfigError
from edge_agent.sources import SignalEvent, SourceStatus
from edge_agent.sources.opcua import (
    OpcUaSource,
    SecurityMaterial,
    SecurityRefused,
    check_endpoints,
)
from simulators.opcua_plc import LinePlc, PlcSecurity, write_certificate
from tests.support.broker import free_port
from tests.support.plc import Recorder, line_config, running

SHARED = pytest.mark.asyncio(loop_scope="module")
MIX = "MIX-1"
AGENT_ID = "line1-edge"
USER = "line1-agent"
PASSWORD = "Zq7-pässwörd:not-in-any-log"
WRONG_PASSWORD = "Zq7-wrong-guess:not-in-any-log"


@dataclass(frozen=True)
class Pki:
    agent_cert: Path  # made by `edge-agent certs`; the secured PLC trusts it
    agent_key: Path
    stranger_cert: Path  # an agent certificate the PLC does not trust
    stranger_key: Path
    plc_cert: Path  # what the secured PLC presents
    plc_key: Path
    other_plc_cert: Path  # another PLC's certificate
    password: Path
    wrong_password: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    assert cli.main(["certs", "--out", str(base / "agent"), "--agent-id", AGENT_ID]) == 0
    stranger = certs.write_pair(
        base / "stranger",
        certs.create(
            application_uri="urn:elsewhere:edge-agent:stranger",
            common_name="edge-agent stranger",
            hostname="elsewhere",
        ),
    )
    plc_cert, plc_key = write_certificate(base / "plc")
    other_plc_cert, _ = write_certificate(base / "other-plc")
    (base / "password").write_text(PASSWORD + "\n", encoding="utf-8")
    (base / "wrong-password").write_text(WRONG_PASSWORD, encoding="utf-8")
    return Pki(
        base / "agent" / certs.CERTIFICATE_FILE,
        base / "agent" / certs.KEY_FILE,
        stranger.certificate,
        stranger.key,
        plc_cert,
        plc_key,
        other_plc_cert,
        base / "password",
        base / "wrong-password",
    )


def port_of(config: Config) -> int:
    return int(config.sources[0].endpoint.split(":")[2].split("/")[0])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured_plc(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LinePlc]:
    config = line_config(free_port(), tmp_path_factory.mktemp("secured"))
    security = PlcSecurity(
        pki.plc_cert, pki.plc_key, trusted=(pki.agent_cert,), users={USER: PASSWORD}
    )
    async with LinePlc(config, port=port_of(config), security=security) as plc:
        yield plc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_plc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LinePlc]:
    config = line_config(free_port(), tmp_path_factory.mktemp("open"))
    async with LinePlc(config, port=port_of(config)) as plc:
        yield plc


def secured(pki: Pki, **overrides: Any) -> dict[str, Any]:
    """The [sources.security] of an agent set up as docs/security.md says."""
    security: dict[str, Any] = {
        "policy": "Basic256Sha256",
        "mode": "SignAndEncrypt",
        "certificate": str(pki.agent_cert),
        "private_key": str(pki.agent_key),
        "server_certificate": str(pki.plc_cert),
        "username": USER,
        "password": {"file": str(pki.password)},
    }
    security.update(overrides)
    return {k: v for k, v in security.items() if v is not None}


def mix_source(plc: LinePlc, tmp_path: Path, security: dict[str, Any]) -> OpcUaSource:
    config = line_config(plc.port, tmp_path, security=security)
    (cfg,) = [s for s in config.sources if s.work_centre == MIX]
    return OpcUaSource(cfg)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "opcua_security_refused"]


async def refused(
    plc: LinePlc, tmp_path: Path, security: dict[str, Any]
) -> tuple[dict[str, Any], Recorder]:
    """Run a source that must not connect: its first refusal (after a second attempt, so it
    keeps trying), and what it emitted meanwhile."""
    src, rec = mix_source(plc, tmp_path, security), Recorder()
    with structlog.testing.capture_logs() as logs:
        async with running(src, rec):
            await until(lambda: len(refusals(logs)) >= 2)
    assert not rec.events(), "nothing is read from a PLC the agent does not trust"
    assert all(isinstance(i, SourceStatus) and not i.connected for i in rec.items)
    (status,) = rec.statuses()  # reported once while the reason stays the same
    first = refusals(logs)[0]
    assert status.detail.startswith(f"security refused at {src.config.endpoint}: ")
    assert first["error"] in status.detail
    assert first["reason"] == refusals(logs)[1]["reason"]
    return first, rec


# ------------------------------------------------------------------ Sign and SignAndEncrypt


@SHARED
@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_a_secured_connection_in_the_configured_mode_carries_the_counts(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path, mode: str
) -> None:
    """Protection: the agent's application certificate, the mode and the user token. Without
    them the secured PLC opens no session (it offers no unsecured endpoint)."""
    order = f"WO-SEC-{mode}"
    await secured_plc.set_order(MIX, order)
    src, rec = mix_source(secured_plc, tmp_path, secured(pki, mode=mode)), Recorder()
    async with running(src, rec):
        await rec.wait_status(True)
        await rec.wait_value("order", order)
        mark = rec.mark()
        await secured_plc.produce(MIX, good=3)
        good = await rec.wait_value("good", 3, after=mark)
        assert good.source == src.name
        # the PLC's side of it: exactly the configured policy and mode, as the configured user
        assert secured_plc.sessions() == [(f"Basic256Sha256/{mode}", USER)]


# ------------------------------------------------------------------ the pinned PLC certificate


@SHARED
async def test_a_plc_presenting_another_certificate_is_refused_naming_both_thumbprints(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path
) -> None:
    """Protection: the pinned server certificate (the agent pins another PLC's)."""
    refusal, _ = await refused(
        secured_plc, tmp_path, secured(pki, server_certificate=str(pki.other_plc_cert))
    )
    expected = certs.thumbprint(certs.read_certificate(pki.other_plc_cert))
    offered = certs.thumbprint(certs.read_certificate(pki.plc_cert))
    assert refusal["reason"] == "server_certificate_mismatch"
    assert refusal["expected_thumbprint"] == expected
    assert refusal["offered_thumbprint"] == offered
    assert expected in refusal["error"]
    assert offered in refusal["error"]
    assert secured_plc.sessions() == []


@SHARED
async def test_re_pinning_the_renewed_plc_certificate_needs_no_restart(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path
) -> None:
    """The files are read at every attempt: the source, refused meanwhile, connects from the
    first attempt after the right certificate is pinned."""
    pinned = tmp_path / "mix-plc.der"
    pinned.write_bytes(pki.other_plc_cert.read_bytes())
    src = mix_source(secured_plc, tmp_path, secured(pki, server_certificate=str(pinned)))
    rec = Recorder()
    with structlog.testing.capture_logs() as logs:
        async with running(src, rec):
            await until(lambda: bool(refusals(logs)))
            assert not rec.events()
            pinned.write_bytes(pki.plc_cert.read_bytes())
            await rec.wait_status(True)
            await rec.wait_for(lambda i: isinstance(i, SignalEvent))
    assert {e["reason"] for e in refusals(logs)} == {"server_certificate_mismatch"}


@SHARED
async def test_a_password_gone_from_the_environment_is_a_refusal_naming_it(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIX_PLC_PASSWORD", PASSWORD)
    security = secured(pki, password={"env": "MIX_PLC_PASSWORD"})
    src, rec = mix_source(secured_plc, tmp_path, security), Recorder()
    monkeypatch.delenv("MIX_PLC_PASSWORD")
    with structlog.testing.capture_logs() as logs:
        async with running(src, rec):
            await until(lambda: bool(refusals(logs)))
    refusal = refusals(logs)[0]
    assert refusal["reason"] == "security_files_unreadable"
    assert "environment variable MIX_PLC_PASSWORD is not set" in refusal["error"]
    assert not [e for e in logs if e["event"] == "opcua_connect_error"]  # not taken for a bug


# ------------------------------------------------------------------ no silent fallback


@SHARED
async def test_a_secured_agent_does_not_fall_back_to_a_plc_without_security(
    open_plc: LinePlc, pki: Pki, tmp_path: Path
) -> None:
    """Protection: only the configured endpoint (policy and mode); the PLC offers None only."""
    refusal, _ = await refused(open_plc, tmp_path, secured(pki))
    assert refusal["reason"] == "endpoint_not_offered"
    assert refusal["wanted"] == "Basic256Sha256/SignAndEncrypt"
    assert refusal["offered"] == "None"
    assert "does not offer Basic256Sha256/SignAndEncrypt" in refusal["error"]
    assert open_plc.sessions() == []


@SHARED
async def test_an_agent_without_security_does_not_connect_to_a_secured_plc(
    secured_plc: LinePlc, tmp_path: Path
) -> None:
    """Protection: only the configured endpoint; the agent asks for None, the PLC offers none
    (and would open no session over an unsecured channel either)."""
    refusal, _ = await refused(secured_plc, tmp_path, {"policy": "None"})
    assert refusal["reason"] == "endpoint_not_offered"
    assert refusal["wanted"] == "None"
    assert refusal["offered"] == "Basic256Sha256/Sign, Basic256Sha256/SignAndEncrypt"
    assert secured_plc.sessions() == []


def endpoint(mode: ua.MessageSecurityMode, certificate: bytes, *tokens: ua.UserTokenType) -> Any:
    policy = (
        security_policies.SecurityPolicyNone
        if mode is ua.MessageSecurityMode.None_
        else security_policies.SecurityPolicyBasic256Sha256
    )
    return ua.EndpointDescription(
        EndpointUrl="opc.tcp://plc:4840/",
        SecurityMode=mode,
        SecurityPolicyUri=policy.URI,
        ServerCertificate=certificate,
        UserIdentityTokens=[ua.UserTokenPolicy(TokenType=t) for t in tokens],
    )


def test_no_fallback_to_another_mode_not_even_a_stronger_one(pki: Pki, tmp_path: Path) -> None:
    """Protection: the mode is compared, not only the policy."""
    plc_der = certs.der(certs.read_certificate(pki.plc_cert))
    offered = [endpoint(ua.MessageSecurityMode.SignAndEncrypt, plc_der, ua.UserTokenType.UserName)]
    security = OpcUaSecurity.model_validate(secured(pki, mode="Sign"))
    material = dataclasses.replace(_material(pki), server_certificate=plc_der)
    with pytest.raises(SecurityRefused, match="does not offer Basic256Sha256/Sign ") as refusal:
        check_endpoints(offered, security, material)
    assert refusal.value.reason == "endpoint_not_offered"
    assert refusal.value.details["offered"] == "Basic256Sha256/SignAndEncrypt"
    # the configured one is taken when it is there, whatever else is offered too
    both = [*offered, endpoint(ua.MessageSecurityMode.Sign, plc_der, ua.UserTokenType.UserName)]
    assert check_endpoints(both, security, material).SecurityMode is ua.MessageSecurityMode.Sign


def test_the_pinned_certificate_is_compared_with_the_first_of_a_chain(pki: Pki) -> None:
    """A PLC may send its certificate followed by its issuers' (one byte string)."""
    plc_der = certs.der(certs.read_certificate(pki.plc_cert))
    other = certs.der(certs.read_certificate(pki.other_plc_cert))
    security = OpcUaSecurity.model_validate(secured(pki))
    material = dataclasses.replace(_material(pki), server_certificate=plc_der)
    mode = ua.MessageSecurityMode.SignAndEncrypt
    chain = endpoint(mode, plc_der + other, ua.UserTokenType.UserName)
    assert check_endpoints([chain], security, material) is chain
    swapped = endpoint(mode, other + plc_der, ua.UserTokenType.UserName)
    with pytest.raises(SecurityRefused, match="not the pinned one"):
        check_endpoints([swapped], security, material)


def test_an_endpoint_without_the_configured_kind_of_user_is_refused(pki: Pki) -> None:
    plc_der = certs.der(certs.read_certificate(pki.plc_cert))
    mode = ua.MessageSecurityMode.SignAndEncrypt
    material = dataclasses.replace(_material(pki), server_certificate=plc_der)
    anonymous_only = [endpoint(mode, plc_der, ua.UserTokenType.Anonymous)]
    with pytest.raises(SecurityRefused, match="does not accept a user name and password"):
        check_endpoints(anonymous_only, OpcUaSecurity.model_validate(secured(pki)), material)
    users_only = [endpoint(mode, plc_der, ua.UserTokenType.UserName)]
    without_user = OpcUaSecurity.model_validate(secured(pki, username=None, password=None))
    with pytest.raises(SecurityRefused, match="does not accept anonymous sessions") as refusal:
        check_endpoints(users_only, without_user, material)
    assert refusal.value.details == {"wanted": "Anonymous", "offered": "UserName"}


def _material(pki: Pki) -> SecurityMaterial:
    return SecurityMaterial.load(OpcUaSecurity.model_validate(secured(pki)))


# ------------------------------------------------------------------ user name and password


@contextmanager
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    """Every log line of the agent (structlog) and of asyncua down to DEBUG."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        yield logs


def assert_not_in_logs(
    secrets: tuple[str, ...], logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    assert caplog.records, "asyncua logged at DEBUG"
    lines = [r.getMessage() for r in caplog.records] + [repr(e) for e in logs]
    for secret in secrets:
        for form in (secret, repr(secret.encode()), secret.encode().hex()):
            assert not [line for line in lines if form in line]


@SHARED
async def test_a_wrong_password_is_refused_clearly_and_never_logged(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Protection: the PLC's check of the user token; the agent says which user it refused."""
    with everything_logged(caplog) as logs:
        refusal, rec = await refused(
            secured_plc, tmp_path, secured(pki, password={"file": str(pki.wrong_password)})
        )
    assert refusal["reason"] == "user_rejected"
    assert refusal["status"] == "BadUserAccessDenied"
    assert f"the PLC refused the user {USER!r}" in refusal["error"]
    assert_not_in_logs((WRONG_PASSWORD, PASSWORD), logs, caplog)
    assert WRONG_PASSWORD not in repr(rec.items)


@SHARED
async def test_the_right_password_works_and_is_never_logged(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Protection: the password is kept out of every log, asyncua's DEBUG record of the
    ActivateSession request included (under SignAndEncrypt the PLC takes the password
    unencrypted inside the encrypted channel, so that record holds it in clear)."""
    src, rec = mix_source(secured_plc, tmp_path, secured(pki)), Recorder()
    with everything_logged(caplog) as logs:
        async with running(src, rec):
            await rec.wait_status(True)
            await rec.wait_for(lambda i: isinstance(i, SignalEvent) and i.signal == "order")
    assert [e["security"] for e in logs if e["event"] == "opcua_connected"] == [
        "Basic256Sha256/SignAndEncrypt"
    ]
    assert_not_in_logs((PASSWORD,), logs, caplog)


@pytest.fixture
def password_in_clear_over_sign(secured_plc: LinePlc) -> Iterator[None]:
    """The secured PLC, misconfigured: it asks for the password without encrypting it (token
    policy None) on its Sign endpoint, whose channel is signed but readable."""
    assert secured_plc.server is not None
    changed = []
    for ep in secured_plc.server.iserver.endpoints:
        if ep.SecurityMode is ua.MessageSecurityMode.Sign:
            for token in ep.UserIdentityTokens:
                if token.TokenType is ua.UserTokenType.UserName:
                    changed.append((token, token.SecurityPolicyUri))
                    token.SecurityPolicyUri = security_policies.SecurityPolicyNone.URI
    assert changed
    yield
    for token, uri in changed:
        token.SecurityPolicyUri = uri


@SHARED
@pytest.mark.usefixtures("password_in_clear_over_sign")
async def test_a_password_is_never_sent_in_clear_over_a_channel_that_does_not_encrypt(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path
) -> None:
    """Protection: the agent's check of the user token policy before it sends the password."""
    refusal, _ = await refused(secured_plc, tmp_path, secured(pki, mode="Sign"))
    assert refusal["reason"] == "password_in_clear"
    assert "use mode SignAndEncrypt" in refusal["error"]


# ------------------------------------------------------------------ the agent's certificate


@SHARED
async def test_a_plc_that_does_not_trust_the_agent_certificate_refuses_it_clearly(
    secured_plc: LinePlc, pki: Pki, tmp_path: Path
) -> None:
    """Protection: the PLC's trust list; the agent names its certificate and thumbprint."""
    stranger = {"certificate": str(pki.stranger_cert), "private_key": str(pki.stranger_key)}
    refusal, _ = await refused(secured_plc, tmp_path, secured(pki, **stranger))
    thumbprint = certs.thumbprint(certs.read_certificate(pki.stranger_cert))
    assert refusal["reason"] == "certificate_rejected"
    assert refusal["status"] == "BadCertificateUntrusted"
    assert refusal["certificate_thumbprint"] == thumbprint
    assert "add it to the PLC's trusted certificates" in refusal["error"]
    assert str(pki.stranger_cert) in refusal["error"]


# ------------------------------------------------------------------ configuration


def configured(pki: Pki, tmp_path: Path, security: dict[str, Any]) -> list[str]:
    """The problems of the example line with this security on its first source."""
    try:
        line_config(1, tmp_path, security=security)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def test_a_secured_source_is_valid_and_the_default_is_no_security(pki: Pki, tmp_path: Path) -> None:
    assert configured(pki, tmp_path, secured(pki)) == []
    assert configured(pki, tmp_path, {}) == []
    assert line_config(1, tmp_path).sources[0].security.policy == "None"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"mode": None},
            "sources[0].security.mode: required with policy 'Basic256Sha256'",
        ),
        (
            {"server_certificate": None},
            "sources[0].security.server_certificate: required with policy 'Basic256Sha256'",
        ),
        (
            {"server_certificate": "/nonexistent/plc.der"},
            "sources[0].security.server_certificate: cannot read certificate "
            "'/nonexistent/plc.der': No such file or directory",
        ),
        (
            {"certificate": "KEY"},
            "sources[0].security.certificate: '{KEY}' is not an X.509 certificate",
        ),
        (
            {"private_key": "STRANGER_KEY"},
            "sources[0].security.private_key: '{STRANGER_KEY}' is not the private key of the "
            "certificate '{CERT}'",
        ),
        (
            {"password": None},
            "sources[0].security.password: required with a username",
        ),
        (
            {
                "policy": "None",
                "mode": None,
                "certificate": None,
                "private_key": None,
                "server_certificate": None,
            },
            "sources[0].security.password: only with a secure policy",
        ),
        (
            {"policy": "None"},
            "sources[0].security.mode: only with a secure policy",
        ),
        (
            {"mode": "Encrypt"},
            "sources[0].security.mode: Input should be 'Sign' or 'SignAndEncrypt'",
        ),
        (
            {"password": PASSWORD},
            "sources[0].security.password: a secret is never written in the configuration",
        ),
    ],
)
def test_security_configuration_errors_name_the_key(
    pki: Pki, tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    """Protection: what would not connect securely (or would leak) does not start at all."""
    files = {"KEY": pki.agent_key, "STRANGER_KEY": pki.stranger_key, "CERT": pki.agent_cert}
    change = {k: str(files[v]) if v in files else v for k, v in change.items()}
    security = secured(pki)
    security.update(change)
    problems = configured(pki, tmp_path, {k: v for k, v in security.items() if v is not None})
    expected = problem.format(**{k: str(v) for k, v in files.items()})
    assert [p for p in problems if p.startswith(expected)], problems
    assert not [p for p in problems if PASSWORD in p]


def test_validate_exits_2_naming_the_key_of_a_key_that_is_not_the_certificates(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "line.toml"
    config.write_text(
        f"""
[agent]
id = "{AGENT_ID}"
[place]
site = "s"
area = "a"
line = "l"
work_centres = ["FILL-1"]
[store]
path = "agent.db"
[[sources]]
name = "filler"
endpoint = "opc.tcp://127.0.0.1:4840/"
work_centre = "FILL-1"
operation = "0020"
signals.order.node = "ns=2;s=FILL-1.Order"
signals.good.node = "ns=2;s=FILL-1.Good"
[sources.security]
policy = "Basic256Sha256"
mode = "Sign"
certificate = "{pki.agent_cert}"
private_key = "{pki.stranger_key}"
server_certificate = "{pki.plc_cert}"
""",
        encoding="utf-8",
    )
    assert cli.main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sources[0].security.private_key: " in err
    assert "is not the private key of the certificate" in err
