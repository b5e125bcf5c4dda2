"""Issue 11 topics on BOTH real brokers (embedded amqtt, generated Mosquitto): a device answers
and announces presence only for its own twin and itself, never writes desired state or
requests, and no longer reads the desired topic; requesters may publish requests/desired."""

from __future__ import annotations

from test_broker_isolation import (  # noqa: F401  (fixtures: broker, deployment)
    Running,
    _collect,
    _settle,
    broker,
    deployment,
)

from ciphertwin.bus.errors import SubscriptionDenied
from ciphertwin.bus.topics import Topics

T = Topics()


async def test_device_interaction_topics_on_real_brokers(broker: Running) -> None:  # noqa: F811
    async with broker.client("cloud") as cloud, broker.client("d1") as d1:
        seen = await _collect(cloud, T.everything())
        await d1.publish(T.answers("t2"), b"forged-answer")       # another twin's answers
        await d1.publish(T.presence("d2"), b"forged-presence")    # another device's presence
        await d1.publish(T.desired("t1"), b"device-desired")      # devices never write desired
        await d1.publish(T.requests("t1"), b"device-request")
        await d1.publish(T.inbox("d1"), b"self-inbox")            # only the cloud fills inboxes
        await d1.publish(T.answers("t1"), b"ok-answer")
        await d1.publish(T.presence("d1"), b"ok-presence")
        await _settle(seen, "ok-presence")
        assert sorted(seen) == sorted([f"{T.answers('t1')}=ok-answer",
                                       f"{T.presence('d1')}=ok-presence"])


async def test_device_does_not_read_desired_but_its_inbox(broker: Running) -> None:  # noqa: F811
    async with (broker.client("cloud") as cloud, broker.client("alice") as alice,
                broker.client("d1") as d1):
        inbox = await _collect(d1, T.inbox("d1"))
        try:  # amqtt refuses the SUBACK; Mosquitto grants it but filters every delivery
            desired = await _collect(d1, T.desired("t1"))
        except SubscriptionDenied:
            desired = []
        await alice.publish(T.desired("t1"), b"sealed-for-the-owner")
        await cloud.publish(T.inbox("d1"), b"re-encrypted-for-d1")
        await _settle(inbox, "re-encrypted-for-d1")
        assert desired == []


async def test_requester_publishes_requests_and_desired(broker: Running) -> None:  # noqa: F811
    async with broker.client("cloud") as cloud, broker.client("rec") as rec:
        seen = await _collect(cloud, T.everything())
        await rec.publish(T.answers("t1"), b"forged-answer")
        await rec.publish(T.presence("d1"), b"forged-presence")
        await rec.publish(T.reported("t1"), b"forged-report")
        await rec.publish(T.requests("t2"), b"ok-request")
        await rec.publish(T.desired("t1"), b"ok-desired")
        await _settle(seen, "ok-desired")
        assert sorted(seen) == sorted([f"{T.requests('t2')}=ok-request",
                                       f"{T.desired('t1')}=ok-desired"])
