"""Contact tracing on the data a real user has: gaps, unsorted and duplicate readings, users
without readings, lat/lon with timestamps, large metre coordinates with Unix-minute epochs —
end to end over the bus (the demo world, embedded broker), checked against counts worked out
by hand *and* against the plaintext reference from the definition.

The loader and the plaintext reference are checked on their own first (no bus).
"""

from __future__ import annotations

import random
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ciphertwin.agents.share_mode import ShareMode
from ciphertwin.demo import plaintext
from ciphertwin.demo.contact_tracing import (
    coordinate_encoding, location_readings, phone_items, plaintext_reference, prepare, process,
    start_world, sync_phones,
)
from ciphertwin.demo.paths import Paths, iso, load_paths
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.job_epochs import FieldEncoding

RADIUS = 5.0
DAY = (int(time.time()) // 86400 - 1) * 86400  # yesterday 00:00 UTC: the cloud takes recent items
VIENNA = (48.2082, 16.3738)
M_PER_DEG_LON = 74_240.0  # at 48.2° N (about; the projection decides, the margins are wide)


def _minute(j: int, second: int = 0) -> float:
    return float(DAY + 60 * j + second)


async def _world(stack: AsyncExitStack):
    w = await start_world(stack, pool_workers=2, rtt_ms=0)
    return w, await stack.enter_async_context(w.client("phones")), \
        await stack.enter_async_context(w.client("owners"))


# -- the loader -------------------------------------------------------------------------------


def _write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_loader_reads_iso_offsets_unix_seconds_and_minute_epochs(tmp_path: Path) -> None:
    t = datetime.fromtimestamp(_minute(3), UTC)
    users = _write(tmp_path, "u.csv", "user,time,lat,lon\n"
                   f"user-000,{t.isoformat().replace('+00:00', 'Z')},48.2,16.37\n"
                   f"user-000,{t.astimezone(timezone(timedelta(hours=2))).isoformat()},48.2,16.37\n"
                   f"Zoë Müller,{_minute(1)},48.21,16.38\n"
                   "carol,,,\n")
    ref = _write(tmp_path, "r.csv", f"time,lat,lon\n{_minute(0):.0f},48.2,16.36\n")
    paths = load_paths(users, ref)
    assert paths.users["user-000"] == [(_minute(3), 48.2, 16.37)] * 2  # the same instant twice
    assert paths.users["carol"] == [] and list(paths.users) == ["user-000", "Zoë Müller", "carol"]
    assert paths.geo is not None and paths.unit == "m@aeqd:48.2,16.36"
    old = _write(tmp_path, "o.csv", "u1,29000000,10.5,-3\nu1,28999999,0,0\n")
    old_ref = _write(tmp_path, "or.csv", "29000000,1,2\n")
    paths = load_paths(old, old_ref)
    assert paths.users["u1"] == [(29_000_000 * 60.0, 10.5, -3.0), (28_999_999 * 60.0, 0.0, 0.0)]
    assert paths.unit == "m" and paths.reference == [(29_000_000 * 60.0, 1.0, 2.0)]


def test_loader_refuses_bad_rows_with_their_line_numbers(tmp_path: Path) -> None:
    ref = _write(tmp_path, "r.csv", "time,lat,lon\n2026-11-30T10:00:00Z,48.2,16.3\n")
    bad = _write(tmp_path, "u.csv", "user,time,lat,lon\n"
                 "a,2026-11-30T10:00:00Z,48.2,16.3\n"
                 "a,2026-11-30T10:00:00,48.2,16.3\n"      # 3: no offset
                 "b,2026-11-30T10:01:00Z,123,16.3\n"      # 4: latitude
                 "\n"
                 "c,yesterday,48.2,16.3\n"                # 6: time
                 ",2026-11-30T10:00:00Z,48.2,16.3\n"      # 7: no user
                 "d,2026-11-30T10:00:00Z,48.2,nan\n")     # 8: not finite
    with pytest.raises(ValidationError) as e:
        load_paths(bad, ref)
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    for line, why in ((3, "no UTC offset"), (4, "latitude is outside"), (6, "yesterday"),
                      (7, "user id"), (8, "finite")):
        assert f"line {line}: " in msg and why in msg
    short = _write(tmp_path, "s.csv", "user,epoch,x,y\na,1,2\n")
    with pytest.raises(ValidationError, match="line.s. 2 do not have 4 columns"):
        load_paths(short, ref)
    with pytest.raises(ValidationError, match="header 'user,when,x,y'"):
        load_paths(_write(tmp_path, "h.csv", "user,when,x,y\n"), ref)
    metres_ref = _write(tmp_path, "mr.csv", "epoch,x,y\n1,2,3\n")
    with pytest.raises(ValidationError, match="both be lat/lon or both be metres"):
        load_paths(_write(tmp_path, "ll.csv", "user,time,lat,lon\na,1,48,16\n"), metres_ref)


# -- the plaintext reference, against the definition worked by hand -----------------------


def test_plaintext_reference_counts_epochs_not_pairs() -> None:
    enc = FieldEncoding("m", 4, -1000.0, 1000.0)
    ref = [(_minute(j), 10.0 * j, 0.0) for j in range(10)]
    users = {
        "gap": [(_minute(j, 30), 10.0 * j, 1.0) for j in range(10) if j != 4],   # 9
        "dupes": [(_minute(2), 20.0, 2.0), (_minute(2, 59), 20.0, 3.0),       # one epoch
                  (_minute(3), 500.0, 0.0), (_minute(5), 50.0, 0.0)],          # far, near
        "boundary": [(_minute(1), 10.0, 5.0), (_minute(2), 20.0, 4.9375)],   # < r strictly
        "none": [],
        "late": [(_minute(6), 51.0, 0.0)],  # 1 m from the reference of minute 5, 9 m at 6
    }
    got = plaintext.contact_tracing(users, ref, encoding=enc, radius=80, since=_minute(0),
                                    until=_minute(10), epoch_s=60)
    assert got == {"gap": 9, "dupes": 2, "boundary": 1, "none": 0, "late": 0}
    # a ±1 epoch window lets "late" meet minute 5's reference too (it still counts once)
    wide = plaintext.contact_tracing({"late": users["late"] * 2}, ref, encoding=enc,
                                     radius=80, since=_minute(0), until=_minute(10), window=1)
    assert wide == {"late": 1}
    # readings outside the window are not part of the job
    assert plaintext.contact_tracing(users, ref, encoding=enc, radius=80, since=_minute(5),
                                     until=_minute(10))["gap"] == 5


# -- end to end over the bus ------------------------------------------------------------------


def _awkward_paths() -> tuple[Paths, dict[str, int]]:
    """Metres; the reference walks east 10 m a minute. Expected counts by hand."""
    ref = [(_minute(j), 1000.0 + 10 * j, 2000.0) for j in range(30)]
    near = lambda j, dy=1.0, s=0: (_minute(j, s), 1000.0 + 10 * j, 2000.0 + dy)  # noqa: E731
    far = lambda j: (_minute(j), 0.0, 0.0)  # noqa: E731
    unsorted = [near(j) if 10 <= j < 15 else far(j) for j in range(30)]
    random.Random(5).shuffle(unsorted)
    users = {
        # near in minutes 0..17 except 5 (no GPS fix: no reading at all), then far
        "gap-user": [near(j) for j in range(18) if j != 5] + [far(j) for j in range(18, 30)],
        "unsorted": unsorted,
        "dupes": [near(3, 2.0), near(3, 100.0, 30), near(4), near(4, -1.0, 59), far(6), far(6),
                  near(8, 3.0, 59)],
        "nobody": [],
        "Zoë Müller": [near(20), near(21, -4.5)],
        "edge": [near(0, 5.0), near(1, 4.9375)],
    }
    return Paths(users, ref), {"gap-user": 17, "unsorted": 5, "dupes": 3, "nobody": 0,
                               "Zoë Müller": 2, "edge": 1}


async def test_gaps_unsorted_duplicates_and_silent_users_over_the_bus() -> None:
    paths, by_hand = _awkward_paths()
    assert plaintext_reference(paths, RADIUS) == by_hand
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack)
        t0, _ = await prepare(w, paths, 1, owners, phones)
        assert w.twins["Zoë Müller"] != "Zoë Müller"  # not a valid twin id: mapped, and back
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=120)
        assert status["state"] == "done", status.get("reason")
        assert result.as_dict() == by_hand

        # the device refuses a value outside the declared range before anything is sealed
        phone = w.phones["gap-user"]
        seq = phone.seq
        with pytest.raises(ValidationError, match="'x' is outside its declared range"):
            phone_items(phone, location_readings(paths, [(_minute(9), 60_000.0, 0.0)]),
                        phone.mode)
        assert phone.seq == seq

        # a reading declared with another encoding (1/8 m) reaches the nodes: they refuse
        other = ShareMode({f: FieldEncoding("m", 3, -50_000.0, 50_000.0) for f in "xy"})
        liar = w.phones["unsorted"]
        liar.mode = other
        extra = (_minute(12, 5), 1.0, 2.0)
        paths.users["unsorted"].append(extra)
        await sync_phones(w, {"unsorted": location_readings(paths, [extra])}, phones)
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=120)
        assert status["state"] == "failed" and result is None
        assert "field 'x' is encoded as" in status["reason"] and "frac 4" in status["reason"]


async def test_lat_lon_with_timestamps_around_a_city(tmp_path: Path) -> None:
    """Vienna, ISO-8601 times with offsets and Unix seconds mixed; projected on the phones."""
    lat0, lon0 = VIENNA
    ref_rows, rows = ["time,lat,lon"], ["user,time,lat,lon"]
    for j in range(8):
        t = datetime.fromtimestamp(_minute(j, 10), UTC)
        lat, lon = lat0 + j * 1e-4, lon0  # the reference walks north ~11 m a minute
        ref_rows.append(f"{t.astimezone(timezone(timedelta(hours=1))).isoformat()},{lat},{lon}")
        if j < 5:  # alice: 2 m east of it, minutes 0..4
            rows.append(f"alice,{t.isoformat().replace('+00:00', 'Z')},{lat},{lon + 2 / M_PER_DEG_LON}")
        rows.append(f"bob,{_minute(j, 50):.0f},{lat},{lon + 20 / M_PER_DEG_LON}")  # 20 m: never
        if j in (2, 3):  # carol: 3 m south, Unix seconds, out of order below
            rows.append(f"carol,{_minute(j, 30)},{lat - 3 / 111_200},{lon}")
    rows.append("dave,,,")
    rows[1:] = reversed(rows[1:])
    paths = load_paths(_write(tmp_path, "u.csv", "\n".join(rows) + "\n"),
                       _write(tmp_path, "r.csv", "\n".join(ref_rows) + "\n"), origin=VIENNA)
    assert paths.unit == "m@aeqd:48.2082,16.3738"
    by_hand = {"alice": 5, "bob": 0, "carol": 2, "dave": 0}
    assert plaintext_reference(paths, RADIUS) == by_hand
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack)
        record: list[dict] = []
        t0, _ = await prepare(w, paths, 50, owners, phones, record=record)
        assert iso(t0) == iso(DAY)
        assert {r["enc"]["x"]["unit"] for r in record} == {"m@aeqd:48.2082,16.3738"}
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=120)
        assert status["state"] == "done", status.get("reason")
        assert result.as_dict() == by_hand


async def test_metres_kilometres_apart_with_unix_minute_epochs_give_no_false_contacts(
        tmp_path: Path) -> None:
    """The old code overflowed its comparison on such data (1000 of 1000 false contacts)."""
    now_minute = int(time.time()) // 60 - 600
    rng = random.Random(11)
    ref = [(now_minute + j, rng.uniform(0, 2000), rng.uniform(0, 5000)) for j in range(12)]
    rows = []
    for u in range(12):  # always at least 1 km east of the reference: never a contact
        rows += [f"user-{u:03d},{now_minute + j},{rng.uniform(3000, 5000):.2f},"
                 f"{rng.uniform(0, 5000):.2f}" for j in range(12)]
    rows += [f"close,{now_minute + j},{ref[j][1] + 3:.4f},{ref[j][2]:.4f}" for j in (1, 4, 7)]
    paths = load_paths(_write(tmp_path, "u.csv", "\n".join(rows) + "\n"),
                       _write(tmp_path, "r.csv", "\n".join(f"{e},{x:.4f},{y:.4f}"
                                                           for e, x, y in ref) + "\n"))
    by_hand = {f"user-{u:03d}": 0 for u in range(12)} | {"close": 3}
    assert plaintext_reference(paths, RADIUS) == by_hand
    async with AsyncExitStack() as stack:
        w, phones, owners = await _world(stack)
        t0, _ = await prepare(w, paths, 1, owners, phones)
        assert t0 == now_minute * 60
        status, result = await process(w, paths, RADIUS, t0, owners, timeout=120)
        assert status["state"] == "done", status.get("reason")
        assert result.as_dict() == by_hand


def test_out_of_range_coordinates_are_refused_before_upload() -> None:
    enc = coordinate_encoding()
    paths = Paths({"far-away": [(_minute(0), 50_000.1, 0.0)]}, [(_minute(0), 0.0, 0.0)])
    mode = ShareMode({"x": enc, "y": enc})
    with pytest.raises(ValidationError, match=r"'x' is outside its declared range \[-50000, 50000\] m"):
        for r in location_readings(paths, paths.users["far-away"]):
            mode(r, ())


def test_demo_cli_takes_csv_replays_old_minutes_and_keeps_ids(tmp_path: Path) -> None:
    """``ciphertwin demo contact-tracing --paths/--reference`` as a user runs it."""
    import subprocess
    import sys

    rows = ["user,epoch,x,y"] + [f"user-000,{600 + j},{10.0 * j},1.0" for j in range(6) if j != 2]
    rows += ["Zoë Müller,603,500,500", "Zoë Müller,601,10,-2", "nobody,,,"]
    ref = ["epoch,x,y"] + [f"{600 + j},{10.0 * j},0" for j in range(6)]
    users_csv, ref_csv = _write(tmp_path, "u.csv", "\n".join(rows)), _write(tmp_path, "r.csv", "\n".join(ref))
    cmd = [sys.executable, "-m", "ciphertwin", "demo", "contact-tracing", "--paths", str(users_csv),
           "--reference", str(ref_csv), "--rtt-ms", "0"]
    old = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert old.returncode == 2 and "--replay" in old.stderr and "Traceback" not in old.stderr
    run = subprocess.run(cmd + ["--replay"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "checked against plaintext: OK" in out and "replayed: every reading moved by" in out
    for user, count in (("user-000", 5), ("Zoë Müller", 1), ("nobody", 0)):
        assert f"  {user:24} {count:>6} contact epoch(s)" in out
    assert "window 1970-01-01T10:00:00Z" not in out and "Z .. " in out  # ISO-8601 UTC, moved
    bad = _write(tmp_path, "b.csv", "user,epoch,x,y\nuser-000,600,1,1\nuser-000,6o1,1,1\n")
    refused = subprocess.run(cmd[:6] + [str(bad)] + cmd[7:], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "line 3: epoch '6o1'" in refused.stderr
    assert "Traceback" not in refused.stderr
