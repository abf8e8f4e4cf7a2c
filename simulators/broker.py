"""An embedded MQTT broker (amqtt) for `edge-agent demo` on a machine with no broker installed.

amqtt is a pure-Python asyncio broker. It runs here in a **subprocess**
(``python -m simulators.broker --port N``), so the demo can stop and restart it to simulate an
outage, and so its tasks, threads, logs and warnings never mix with the caller's. It binds
loopback only and logs at WARNING level (to a file with ``--log``).

What to know about it (amqtt 0.12, measured; tests/test_embedded_broker.py keeps each one):

- **MQTT 3.1.1 only.** An MQTT 5 CONNECT is refused (CONNACK "unacceptable protocol version").
- **amqtt drops anonymous sessions.** Its stock ``AnonymousAuthPlugin`` marks every client it lets
  in as anonymous, and amqtt then neither keeps an anonymous client's session nor queues QoS 1
  messages for it while it is away, whatever its clean-session flag. :class:`LoopbackAuth` lets
  every client in (the broker only listens on loopback) without that mark, so a persistent
  3.1.1 session (clean_session=False) works as the protocol says.
- **amqtt forgets an unacknowledged delivery** when its client disconnects before the PUBACK,
  instead of sending it again at the next connect (as MQTT requires and mosquitto does). The
  broker process patches that (:func:`keep_unacknowledged_deliveries`).
- **Sessions live in memory.** A restart forgets every session, subscription and queued message.
  ``--session CLIENT_ID=FILTER`` (:class:`DurableSessions`) creates a client's session and its
  QoS 1 subscription at every start, before the listener opens, so messages published right after
  a restart are queued for that client (the MES simulator) even before it has reconnected.
- **So its PUBACK is not delivery.** What it acknowledged to the agent but had not yet delivered
  dies with it: across a restart, only the agent's ``delivery = "mes-ack"`` (the MES simulator's
  ``mes_ack``) loses nothing (see :func:`serve` for the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

# amqtt ships no type information (no py.typed): its names are Any to mypy
from amqtt.broker import Broker, BrokerContext  # type: ignore[import-untyped]
from amqtt.mqtt.protocol.handler import ProtocolHandler  # type: ignore[import-untyped]
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin  # type: ignore[import-untyped]
from amqtt.session import OUTGOING  # type: ignore[import-untyped]

#: the one MQTT protocol version amqtt speaks
PROTOCOLS: tuple[str, ...] = ("3.1.1",)


# ---------------------------------------------------------------------------------------- ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) can be handed to an outgoing
    connection while the broker is stopped, e.g. a client's reconnect attempt, and then the
    restarted broker finds its own port taken ("Address already in use").
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low - 1))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------ amqtt plugins


class LoopbackAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped (Any)
    """Lets every client in, *without* marking its session anonymous.

    The broker listens on loopback only. amqtt's own ``AnonymousAuthPlugin`` would mark each
    session anonymous, and amqtt forgets anonymous sessions and queues nothing for them.
    """

    async def authenticate(self, *, session: Any) -> bool:
        return True


class DurableSessions(BasePlugin[BrokerContext]):  # type: ignore[misc]  # amqtt is untyped (Any)
    """Creates the configured clients' sessions and QoS 1 subscriptions at every broker start."""

    @dataclass
    class Config:
        #: ``client_id=topic_filter`` entries
        sessions: list[str] = field(default_factory=list)

    async def on_broker_pre_start(self) -> None:
        for entry in self.config.sessions:
            client_id, topic_filter = parse_session(entry)
            await self.context.add_subscription(client_id, topic_filter, 1)


def parse_session(entry: str) -> tuple[str, str]:
    """``CLIENT_ID=TOPIC_FILTER`` → (client id, topic filter); ValueError names what is wrong."""
    client_id, sep, topic_filter = entry.partition("=")
    if not sep or not client_id or not topic_filter:
        raise ValueError(f"expected CLIENT_ID=TOPIC_FILTER, got {entry!r}")
    return client_id, topic_filter


def keep_unacknowledged_deliveries() -> None:
    """Make amqtt 0.12 deliver again a QoS 1 message its subscriber did not acknowledge.

    amqtt removes an outgoing message from the session's in-flight store when its wait for the
    PUBACK ends, acknowledged or not (the client disconnected, or 5 s passed), so a client that
    disconnects before its PUBACK never gets that message again (measured: mosquitto sends it
    again with DUP at the next connect, as MQTT requires). Putting an unacknowledged message back
    lets amqtt's own retry, run when the session next connects, send it again. Applied in the
    broker process only, never on import.
    """
    original = ProtocolHandler._handle_qos1_message_flow
    if getattr(original, "keeps_unacknowledged", False):
        return

    async def qos1_flow(handler: Any, app_message: Any) -> None:
        try:
            await original(handler, app_message)
        finally:
            if (
                app_message.direction == OUTGOING
                and app_message.puback_packet is None
                and handler.session is not None
            ):
                handler.session.inflight_out[app_message.packet_id] = app_message

    qos1_flow.keeps_unacknowledged = True  # type: ignore[attr-defined]
    ProtocolHandler._handle_qos1_message_flow = qos1_flow


class _BenignRaces(logging.Filter):
    """Drops amqtt's warning for a PUBACK that arrives as its client disconnects.

    The client did acknowledge; amqtt had just cancelled the wait while closing the connection.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("already done")


def broker_config(host: str, port: int, sessions: Sequence[str] = ()) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, our two plugins, nothing else.

    amqtt's default plugins are left out on purpose: the event and packet loggers log every packet,
    the ``$SYS`` plugin publishes broker statistics every 20 s, and the anonymous-auth plugin
    breaks persistent sessions (see the module docstring).
    """
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "listeners": {"default": {"type": "tcp", "bind": bind}},
        "plugins": {
            f"{LoopbackAuth.__module__}.LoopbackAuth": {},
            f"{DurableSessions.__module__}.DurableSessions": {"sessions": list(sessions)},
        },
    }


async def serve(
    host: str,
    port: int,
    sessions: Sequence[str] = (),
    ready_file: Path | None = None,
    exit_on_eof: bool = False,
) -> None:
    """Run the broker until SIGTERM or SIGINT, then end the process at once.

    ``ready_file`` is created once the listener is open: the caller waits for it instead of
    probing the port, since amqtt logs an error for every connection that sends no CONNECT.
    With ``exit_on_eof`` the broker also stops when its standard input closes: the parent holds
    the other end, so a parent that dies without stopping it (kill -9) takes the broker along.

    The stop is deliberately abrupt, as a crash: amqtt keeps nothing to save, and its own
    shutdown (0.12) first drops every session, then goes on accepting and acknowledging publishes
    for up to 5 s while its delivery tasks wind down, publishes that reach no one. Measured with
    the agent's uplink publishing 2,000 messages through a restart in ``delivery = "broker"``
    mode: about 900 lost with amqtt's shutdown, 350 to 450 with this one (what the broker had
    acknowledged but not yet delivered), none in ``mes-ack`` mode either way.
    """
    keep_unacknowledged_deliveries()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_on_eof:

        def wait_for_eof() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_eof, name="broker-stdin-eof", daemon=True).start()
    broker = Broker(broker_config(host, port, sessions))
    await broker.start()
    if ready_file is not None:
        ready_file.touch()
    print(
        f"embedded MQTT broker (amqtt {version('amqtt')}, MQTT 3.1.1) on {host}:{port}; "
        "Ctrl-C stops it",
        flush=True,
    )
    await stop.wait()
    logging.shutdown()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.broker",
        description="An embedded MQTT 3.1.1 broker (amqtt) on a loopback address, for the demo.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--log", type=Path, help="write the broker's log here (default stderr)")
    parser.add_argument("--ready", type=Path, help="create this file once the port is open")
    parser.add_argument(
        "--exit-on-eof", action="store_true", help="stop when standard input closes"
    )
    parser.add_argument(
        "--session",
        action="append",
        default=[],
        metavar="CLIENT_ID=FILTER",
        help="create this client's persistent session, subscribed at QoS 1, at every start "
        "(repeatable)",
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        parser.error(f"--host must be a loopback address (got {args.host!r})")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1..65535 (got {args.port})")
    for entry in args.session:
        try:
            parse_session(entry)
        except ValueError as exc:
            parser.error(f"--session: {exc}")

    handler: logging.Handler = (
        logging.FileHandler(args.log, encoding="utf-8") if args.log else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_BenignRaces())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        asyncio.run(serve(args.host, args.port, args.session, args.ready, args.exit_on_eof))
    except Exception as exc:  # start-up failures (port in use): one line, not a traceback
        cause = exc.__cause__ or exc
        print(f"embedded broker on {args.host}:{args.port} failed: {cause}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------- the caller's handle


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@dataclass
class EmbeddedBroker:
    """One amqtt broker process on ``host:port`` (loopback); keeps its port across restarts.

    The same surface as the tests' mosquitto ``Broker``: ``start``, ``stop``, ``restart``,
    ``running``, ``host``, ``port``, plus ``protocols`` (only "3.1.1"). ``sessions`` are
    (client id, topic filter) pairs whose persistent sessions exist from every start on (see the
    module docstring). The broker's log goes to ``workdir/amqtt.log``.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    sessions: tuple[tuple[str, str], ...] = ()
    process: subprocess.Popen[bytes] | None = None

    protocols: ClassVar[tuple[str, ...]] = PROTOCOLS

    def __post_init__(self) -> None:
        if not is_loopback(self.host):
            raise ValueError(f"the embedded broker binds loopback only (got {self.host!r})")

    @property
    def log_file(self) -> Path:
        return self.workdir / "amqtt.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; returns once its port accepts connections.

        The broker process signals readiness with a file rather than being probed: amqtt logs an
        error for each connection that closes without a CONNECT.
        """
        assert self.process is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        stderr_file = self.workdir / "amqtt.stderr"
        ready_file = self.workdir / "amqtt.ready"
        ready_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "simulators.broker",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log",
            str(self.log_file),
            "--ready",
            str(ready_file),
            "--exit-on-eof",
        ]
        for client_id, topic_filter in self.sessions:
            command += ["--session", f"{client_id}={topic_filter}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_project_root()), env.get("PYTHONPATH")) if p
        )
        with stderr_file.open("wb") as err:
            # stdin stays open to the broker while this process lives (--exit-on-eof)
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._close_stdin()
                self.process = None
                detail = stderr_file.read_text(errors="replace").strip()
                raise RuntimeError(f"embedded broker exited at start-up: {detail}")
            if ready_file.exists():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on port {self.port} in {timeout} s")

    def stop(self) -> None:
        """Stop the broker; its port is free again when this returns.

        SIGTERM ends the broker process at once, as a crash would (see :func:`serve`); SIGKILL
        follows if it has not ended in 5 s.
        """
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._close_stdin()
        self.process = None

    def _close_stdin(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
