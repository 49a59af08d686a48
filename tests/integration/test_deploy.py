"""The systemd unit verifies, and ``make install``'s script puts a working venv, the unit and
a private settings file in place (into folders of the test's own, never the host's)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.deploy import UNIT, unit_directive

ROOT = UNIT.parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian's systemd) is missing"
)


def _verify(unit: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_the_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; the shipped path is the installed one.
    [exec_start] = unit_directive("ExecStart")
    assert exec_start == "/opt/dataplane/venv/bin/dataplane"
    local = tmp_path / "dataplane.service"
    local.write_text(
        UNIT.read_text().replace(exec_start, str(ROOT / ".venv" / "bin" / "dataplane"))
    )
    _verify(local)
    # VMMs outlive the service; stopping it must not end them.
    assert unit_directive("KillMode") == ["process"]
    assert unit_directive("NoNewPrivileges") == ["yes"]


def test_install_puts_the_venv_the_unit_and_the_settings_in_place(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PREFIX": str(tmp_path / "opt"),
        "UNIT_DIR": str(tmp_path / "units"),
        "CONFIG_DIR": str(tmp_path / "etc"),
        "DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        ["scripts/install.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    binary = tmp_path / "opt" / "venv" / "bin" / "dataplane"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("dataplane ")
    unit = tmp_path / "units" / "dataplane.service"
    text = unit.read_text()
    assert f"ExecStart={binary}\n" in text
    assert f"ReadWritePaths={tmp_path / 'data'}\n" in text
    assert f"EnvironmentFile=-{tmp_path / 'etc' / 'env'}\n" in text
    _verify(unit)
    settings = tmp_path / "etc" / "env"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "etc").stat().st_mode) == 0o700
    # A second install keeps the operator's settings.
    settings.write_text("AUTH_TOKEN=kept-0123456789abcdef\n")
    again = subprocess.run(
        ["scripts/install.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert settings.read_text() == "AUTH_TOKEN=kept-0123456789abcdef\n"
