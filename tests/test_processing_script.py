"""examples/processing.sh, run as written: processing with every party a separate process.

Broker, cloud, operator, three nodes, three owners with phones in share mode and a receiver,
each a `ciphertwin` process over MQTT; the receiver fetches the result only after the job
finished. The result is checked against contact tracing computed here, from the definition,
on the very readings the phones uploaded.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from ciphertwin.agents.geo import GeoFrame
from ciphertwin.broker.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
EPOCH_S, RADIUS_M = 10, 5.0  # as the script submits the job: --epoch-s 10, radius 80/16 m


def _contacts(workdir: Path, origin: tuple[float, float], users: list[str],
              reference: str) -> dict[str, int]:
    """Per user: the epochs in which the user and the reference each have a reading and some
    pair of them is closer than the radius (an epoch counts once)."""
    frame = GeoFrame(*origin)

    def by_epoch(who: str) -> dict[int, list[tuple[float, float]]]:
        out: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for line in (workdir / f"{who}.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[math.floor(r["time"] / EPOCH_S)].append(frame.project(r["values"]["lat"],
                                                                      r["values"]["lon"]))
        return out

    ref = by_epoch(reference)
    result = {}
    for user in users:
        count = 0
        for epoch, points in by_epoch(user).items():
            if any(math.dist(p, q) < RADIUS_M for p in points for q in ref.get(epoch, [])):
                count += 1
        result[f"{user}-path"] = count
    return result


@pytest.mark.timeout(240)  # ~30 s alone on 2 cores; far more when the machine is shared
def test_processing_script_runs_every_party_as_a_process(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": str(free_port()), "WORKDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(ROOT / "examples" / "processing.sh")], env=env,
                         capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    out = run.stdout

    # the receiver asked for the result only after the job had finished
    job, results = out.split("== 4. job")[1].split("== 6.")[0].split("== 5. results")
    assert "job trace-1: done at 20" in job and job.rstrip().endswith("Z")
    assert "2 results of trace-1 written to" in results
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["job"] == "trace-1" and got["function"] == "contact_tracing"
    expected = _contacts(tmp_path, (48.2082, 16.3738), ["alice", "carol"], "dave")
    assert expected == {"alice-path": 4, "carol-path": 1}  # what the script's comments promise
    assert got["results"] == expected  # ids verbatim, gaps/duplicates/out-of-order handled

    # every share reached the cloud before the job; times print as ISO-8601 UTC
    for owner, n in (("alice", 9), ("carol", 11), ("dave", 10)):
        assert f"{owner}-path: {3 * n} of {3 * n} shares stored" in out
    assert "until 20" in out and "Z\ntoken id" in out  # grant-processing's validity

    # node entries are public and were accepted as they are; key files stay private
    for i in range(3):
        assert stat.S_IMODE((tmp_path / f"node{i}.entry").stat().st_mode) == 0o644
        assert (tmp_path / "home" / f"node{i}" / "secret.key").stat().st_mode & 0o077 == 0
    assert "roster v1 published: node0, node1, node2" in out

    # a job the permits do not cover fails with its reason on one line, exit code 1
    refused = out.split("== 6. a job the permits do not cover")[1]
    errors = [line for line in refused.splitlines() if line.startswith("ciphertwin: error:")]
    assert len(errors) == 1 and "job sum-1 failed at 20" in errors[0], refused
    assert "function-class-not-allowed" in errors[0]
    assert refused.rstrip().endswith("exit code 1")
