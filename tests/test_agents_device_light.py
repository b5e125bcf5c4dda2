"""The device path must stay light enough for a Raspberry Pi: no numpy anywhere in it."""

from __future__ import annotations

import subprocess
import sys


def test_device_agent_imports_no_numpy() -> None:
    code = ("import sys, ciphertwin.agents.device, ciphertwin.agents.cli\n"
            "bad = sorted(m for m in sys.modules if m == 'numpy' or m.startswith('numpy.'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"device path imports {out.stdout.strip()}"
