"""The deployment examples in config/ cannot rot: the systemd unit is one systemd accepts, and the
commands it runs are commands edge-agent accepts."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import build_parser

CONFIG = Path(__file__).resolve().parents[1] / "config"
UNIT = CONFIG / "edge-agent.service"
INSTALLED = "/opt/edge-agent/.venv/bin/edge-agent"


def _unit() -> configparser.ConfigParser:
    # systemd allows a key more than once (LoadCredential): keep the last, enough to read it
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # the unit as installed, but pointing at this checkout's edge-agent (verify checks it runs)
    executable = Path(sys.executable).parent / "edge-agent"
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(executable)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    # verify exits 0 even for an unknown key or a bad value: what it prints is the verdict
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr


@pytest.mark.parametrize("key", ["ExecStartPre", "ExecStart"])
def test_the_unit_runs_commands_edge_agent_accepts(key: str) -> None:
    argv = shlex.split(_unit()["Service"][key])
    assert argv[0] == INSTALLED
    args = build_parser().parse_args(argv[1:])
    assert args.command in ("validate", "run")
    assert str(args.config).startswith("/etc/edge-agent/")


def test_the_unit_does_not_restart_what_needs_a_person() -> None:
    service = _unit()["Service"]
    # 2: a bad configuration, 3: a store the agent cannot trust (edge_agent.cli exit codes)
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "3"}
    assert service["Restart"] == "on-failure"
