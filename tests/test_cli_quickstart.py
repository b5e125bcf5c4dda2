"""The README quickstart, run as written: separate `ciphertwin` processes over MQTT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ciphertwin.broker.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_shares_then_revokes(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": str(free_port()), "WORKDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    owner = out.split("== owner history")[1].split("== receiver history")[0]
    assert "thermo1#20 temperature" in owner
    receiver = out.split("== receiver history")[1].split("== after revocation")[0]
    assert receiver.strip().splitlines()[0].strip() == "20"
    after = out.split("== after revocation")[1]
    assert after.strip().splitlines()[0].strip() == "0"
    # secret key files are private; the bundle never leaves 0600
    assert (tmp_path / "home" / "alice" / "secret.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "thermo1.bundle").stat().st_mode & 0o077 == 0
