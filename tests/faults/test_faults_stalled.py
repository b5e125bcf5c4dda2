"""A stalled subscriber: a client of the owner subscribes to the twin's live stream and then
never reads (nor pings). The broker must keep serving everybody else — devices keep being
stored at their rate, history queries are answered — and stay bounded in memory (it drops the
stalled client at its keepalive, or drops what it cannot deliver), on both brokers."""

from __future__ import annotations

import time

import pytest
from fault_checks import finish_and_check
from harness import OWNER, TWIN, sqlite_rows, stalled_subscriber

from ciphertwin.bus.topics import Topics

pytestmark = [pytest.mark.faults, pytest.mark.slow]

RATE, PAD = 50.0, 2500  # per device: ~150 KB/s of stream to the stalled client, ~2 MB/s
STALL_S = 30.0          # of broker memory when the broker buffers it all (amqtt 0.12.1)
KEEPALIVE_S = 10        # the stalled client's keepalive: brokers may drop it after 15 s
LATE_S = 16.0           # from here on a bounded broker has stopped growing (cap, or cut at 15 s)
MAX_GROWTH_MB = 40.0    # peak broker RSS growth over the stall (fixed amqtt: 10-23 MB)
MAX_LATE_GROWTH_MB = 10.0  # growth after LATE_S (bounded: ~0-3 MB; unbounded: ~25 MB)
MAX_GAP_S = 5.0         # longest pause in any device's stored items during the stall


def _longest_gap(times: list[float], start: float, end: float) -> float:
    edges = [start, *sorted(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in zip(edges, edges[1:], strict=False))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_stalled_stream_subscriber(make_lab, broker: str) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab(broker, rate=RATE, pad=PAD)
    lab.build()
    lab.stream(2)
    failures: list[str] = []
    base_kb = lab.rss_kb(lab.broker)
    # the owner's live stream of the twin (what `ciphertwin watch` subscribes to)
    sock = stalled_subscriber(lab, Topics().stream(TWIN, OWNER), keepalive=KEEPALIVE_S)
    start = lab.event("stalled subscriber connected")
    peak_kb, late_kb, history_ok = base_kb, None, None
    try:
        while time.time() - start < STALL_S:
            rss = lab.rss_kb(lab.broker)
            peak_kb = max(peak_kb, rss)
            if late_kb is None and time.time() - start >= LATE_S:
                late_kb = peak_kb
            if history_ok is None and time.time() - start > STALL_S / 2:
                # the last second's items (a small reply: its buffering is not the stall's),
                # answered in full while the stall goes on
                since = time.time() - 1
                (expected,), = sqlite_rows(lab.store_path, "SELECT COUNT(*) FROM envelopes "
                                           "WHERE item_time >= ?", [since])
                history_ok = len(lab.history(since=since)) >= expected
            time.sleep(0.5)
    finally:
        sock.close()
    end = lab.event("stalled subscriber closed")
    growth_mb = (peak_kb - base_kb) / 1024
    late_mb = (peak_kb - (late_kb or base_kb)) / 1024
    if growth_mb > MAX_GROWTH_MB or late_mb > MAX_LATE_GROWTH_MB:
        failures.append(f"{broker} broker grew by {growth_mb:.0f} MB during a {STALL_S:.0f} s "
                        f"stall, {late_mb:.0f} MB of it after {LATE_S:.0f} s (allowed "
                        f"{MAX_GROWTH_MB:.0f} / {MAX_LATE_GROWTH_MB:.0f} MB): buffering "
                        "without bound")
    if not history_ok:
        failures.append("the owner's history query was not answered in full during the stall")
    rows = lab.stored_rows()
    for d in lab.device_names:
        gap = _longest_gap([t for dev, _, t in rows if dev == d], start, end)
        if gap > MAX_GAP_S:
            failures.append(f"{d}: nothing stored for {gap:.1f} s during the stall")
    if not lab.broker.alive:
        failures.append(f"the {broker} broker died during the stall")
    print(f"{broker}: broker RSS +{growth_mb:.1f} MB peak during the stall "
          f"(+{late_mb:.1f} MB after {LATE_S:.0f} s), "
          f"+{(lab.rss_kb(lab.broker) - base_kb) / 1024:.1f} MB after it")
    finish_and_check(lab, failures)

