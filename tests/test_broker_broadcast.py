"""amqtt 0.12.1 walks its subscription table while awaiting the ACL plugins for each
subscriber: a SUBSCRIBE (or a disconnect) during a broadcast changed the table under it,
the broadcast died with ``RuntimeError: dictionary changed size during iteration`` and the
message never reached the remaining subscribers. The embedded broker walks a snapshot."""

from __future__ import annotations

import asyncio
import logging

from ciphertwin.bus.client import BusClient
from tests.test_broker_isolation import Running, embedded, deployment  # noqa: F401 - fixtures

N = 2000


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        if "changed size during iteration" in text:
            self.seen.append(text)


async def test_subscriptions_changing_during_broadcasts_lose_no_message(
        embedded: Running) -> None:  # noqa: F811
    t = embedded
    errors = _Errors()
    logging.getLogger("amqtt").addHandler(errors)
    got: list[bytes] = []

    async def keep(topic: str, payload: bytes, retain: bool) -> None:
        got.append(payload)

    async def nothing(topic: str, payload: bytes, retain: bool) -> None:
        return None

    try:
        async with t.client("cloud") as cloud, t.client("d1") as d1:
            await cloud.subscribe(cloud.topics.filter("twin_data"), keep, qos=0)
            churning = True

            async def churn() -> None:  # alice comes and goes, subscribing each time
                while churning:
                    async with t.client("alice") as alice:
                        for i in range(5):
                            await alice.subscribe(alice.topics.replies("alice", f"r{i}"),
                                                  nothing, qos=0)

            churner = asyncio.create_task(churn())
            for i in range(N):
                await d1.publish(d1.topics.twin_data("t1"), i.to_bytes(4, "big"), qos=0)
                if i % 50 == 0:
                    await asyncio.sleep(0)
            churning = False
            await churner
            for _ in range(100):
                if len(got) >= N:
                    break
                await asyncio.sleep(0.05)
    finally:
        logging.getLogger("amqtt").removeHandler(errors)
    assert not errors.seen, errors.seen[:1]
    assert sorted(got) == [i.to_bytes(4, "big") for i in range(N)]


async def test_the_subscription_table_is_walked_over_a_snapshot() -> None:
    """What amqtt does in ``_run_broadcast``: await (the ACL plugins) inside the walk, while
    another connection subscribes and another one's subscriptions are deleted."""
    from ciphertwin.broker.embedded import EmbeddedBroker

    async with EmbeddedBroker(port=0) as b:
        table = b._broker._subscriptions  # type: ignore[union-attr]  # noqa: SLF001
        table.update({"a/#": [], "b/+": [], "c": []})
        walked = []
        for k_filter, subscriptions in table.items():
            await asyncio.sleep(0)
            table[f"new/{k_filter}"] = []  # a SUBSCRIBE handled meanwhile
            table.pop("c", None)  # a disconnect handled meanwhile
            walked.append(k_filter)
        for k_filter in table:
            table.pop(k_filter)
        assert walked == ["a/#", "b/+", "c"] and not table


def test_a_broadcast_is_formatted_without_its_payload() -> None:
    """amqtt formats every broadcast into a debug message even with debug logging off: the
    record must not drag a megabyte payload's repr along (it cost more than the routing)."""
    from ciphertwin.broker.embedded import _Broadcast

    record = _Broadcast(session=None, topic="ct/x/nodes/n0/inputs/j1", data=bytes(4 << 20))
    text = f"Processing broadcast message: {record}"
    assert len(text) < 200 and "4194304 bytes" in text and "ct/x/nodes/n0/inputs/j1" in text
    assert record["data"] == bytes(4 << 20) and record.get("qos", 1) == 1  # still amqtt's dict
