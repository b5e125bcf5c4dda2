"""The disk under the cloud's store fills up mid-stream (a small tmpfs mounted for the store
folder, filled with a filler file), then space is freed: the cloud must not acknowledge what
it could not store (items wait in the device outboxes), must either keep running or exit
non-zero (then a supervisor — here the test — restarts it), and after space is freed every
item arrives exactly once."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from fault_checks import finish_and_check

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TMPFS_SIZE = "16m"  # room for the store and its WAL (SQLite checkpoints at ~4 MB of WAL)


def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the full-disk test needs root")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (full-disk test skipped): {run.stderr.strip()}")


def _fill(path: Path) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


@pytest.mark.timeout(180)
def test_store_disk_full_then_freed(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab("embedded")
    _mount_tmpfs(lab.store_dir)
    try:
        lab.build()
        lab.stream(3)
        failures: list[str] = []
        filler = lab.store_dir / "filler"
        _fill(filler)
        full = lab.event("store disk full")
        lab.stream(6)
        stored_while_full = lab.stored_count(since=full + 1.0)
        pending = sum(lab.outbox(d)[1] for d in lab.device_names)
        if pending == 0:
            failures.append("no item waits in a device outbox while the store's disk is full: "
                            "the cloud acknowledged what it could not store?")
        exited = lab.cloud.proc.poll()  # type: ignore[union-attr]
        complaints = [line for line in lab.cloud.output().splitlines()
                      if '"level": "error"' in line or "Error" in line]
        if exited is None and not complaints:
            failures.append("the cloud kept running on a full disk without logging an error")
        if exited == 0:
            failures.append("the cloud exited 0 on a full disk (a supervisor would not restart it)")
        filler.unlink()
        freed = lab.event("space freed")
        if exited is not None:  # a supervisor restarts a cloud that gave up
            lab.cloud.start()
            freed = lab.event("cloud restarted")
        try:
            resumed = lab.wait_resumed(freed, 20)
        except TimeoutError as exc:
            failures.append(f"after space was freed: {exc}")
            resumed = {}
        lab.stream(2)
        print(f"while full: {stored_while_full} stored, {pending} pending in outboxes, "
              f"cloud {'exited ' + str(exited) if exited is not None else 'kept running'} "
              f"({len(complaints)} error lines); "
              f"resumed after freeing: {resumed}")
        finish_and_check(lab, failures)
    finally:
        lab.close()
        time.sleep(0.2)
        subprocess.run(["umount", "-l", str(lab.store_dir)], capture_output=True)
