"""ferry-coordinator's start-up: mistakes a user can make are one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster import REPO
from coordcluster import CoordinatorProcess


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.server", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_a_taken_port_is_refused(tmp_path: Path) -> None:
    first = CoordinatorProcess(tmp_path, []).start()
    try:
        result = run("--listen", first.address, "--state", str(tmp_path / "other.db"))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"ferry-coordinator: cannot listen on {first.address}"
        )
    finally:
        first.stop()


def test_bad_arguments_and_a_foreign_state_file_are_one_line(tmp_path: Path) -> None:
    result = run("--listen", "nowhere", "--state", str(tmp_path / "s.db"))
    assert result.returncode == 2
    assert result.stderr == "ferry-coordinator: --listen 'nowhere': expected HOST:PORT\n"
    bogus = tmp_path / "bogus.db"
    bogus.write_text("this is not a database " * 100)
    result = run("--listen", "127.0.0.1:0", "--state", str(bogus))
    assert result.returncode == 2
    assert result.stderr.startswith(f"ferry-coordinator: state file {bogus}")
    assert result.stderr.count("\n") == 1
    result = run("--help")
    assert result.returncode == 0
    for option in ("--listen", "--state", "--heartbeat-timeout", "--weigher", "--on-node-down"):
        assert option in result.stdout
