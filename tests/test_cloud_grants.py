"""GrantBook: the per-twin index answers exactly what a scan of every grant would."""

from __future__ import annotations

from pathlib import Path

from ciphertwin.cloud_twin.grants import GrantBook
from ciphertwin.cloud_twin.store import Grant, SqliteTwinStore


def _grant(gid: str, owner: str, receiver: str, twins: tuple[str, ...], policy: str) -> Grant:
    return Grant(gid, owner, receiver, twins, policy, b"rekey-" + gid.encode(), 1.0)


async def test_index_follows_install_replace_revoke_and_reload(tmp_path: Path) -> None:
    store = SqliteTwinStore(tmp_path / "cloud.sqlite")
    await store.open()
    try:
        book = GrantBook(store)
        assert await book.install(_grant("g1", "alice", "bob", ("t1", "t2"), "type:temp"))
        assert await book.install(_grant("g2", "alice", "carol", ("t2",), "type:temp OR type:hum"))
        assert await book.install(_grant("g3", "dave", "bob", ("t9",), "type:temp"))
        ids = lambda gs: sorted(g.grant_id for g in gs)  # noqa: E731
        assert ids(book.matching("t2", ("type:temp",))) == ["g1", "g2"]
        assert ids(book.matching("t2", ("type:hum",))) == ["g2"]
        assert ids(book.matching("t1", ("type:hum",))) == []
        assert ids(book.matching("t3", ("type:temp",))) == []
        assert ids(book.of_receiver("bob", "t1")) == ["g1"]
        assert ids(book.of_receiver("bob", "t9")) == ["g3"]
        # replacing g1 narrows it to t1: t2 no longer lists it
        assert await book.install(_grant("g1", "alice", "bob", ("t1",), "type:temp"))
        assert ids(book.matching("t2", ("type:temp",))) == ["g2"]
        assert ids(book.matching("t1", ("type:temp",))) == ["g1"]
        assert not await book.install(_grant("g1", "mallory", "eve", ("t1",), "type:temp"))
        assert not await book.revoke("mallory", "g2", 2.0)  # not hers
        assert await book.revoke("alice", "g2", 2.0)
        assert ids(book.matching("t2", ("type:hum",))) == []
        reloaded = GrantBook(store)
        await reloaded.load()
        assert ids(reloaded.matching("t1", ("type:temp",))) == ["g1"]
        assert ids(reloaded.matching("t2", ("type:temp",))) == []
        assert ids(reloaded.of_receiver("bob", "t9")) == ["g3"]
    finally:
        await store.close()
