"""Issue 8, holes 1 and 9a: who may name the processing nodes, and that no node holds two shares.

Attacks: the cloud (or a broker that injects) publishes a roster signed by its own key; the
real operator's key signs a roster at version 2^63 − 1 (a typo that would lock every later
roster out); a new roster moves a node — its id, signing key or PRE key — to another share
index; an owner is shown such a roster when it re-keys; principals started without any
operator key.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import structlog
from ports import wait_for_port

from ciphertwin.agents.identity import Identity, is_encrypted, load_identity, save_identity
from ciphertwin.agents.operator_cli import pinned_operator
from ciphertwin.agents.processing import ResultReceiver, fetch_roster, grant_processing
from ciphertwin.broker.embedded import free_port
from ciphertwin.bus.client import BusClient
from ciphertwin.bus.envelope import decode
from ciphertwin.cli import main
from ciphertwin.cloud_twin.jobs import JobManager
from ciphertwin.config.settings import load_deployment
from ciphertwin.crypto.hpke import X25519KeyPair
from ciphertwin.crypto.kpcpre import PreKeyPair, PrePublicKey
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.demo.contact_tracing import add_owners, epoch_policy, start_world
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.roster import NodeIdentity
from ciphertwin.mpc_nodes.service import ProcessingNode
from ciphertwin.protocol.jobs import NodeRoster, build_roster, parse_roster
from ciphertwin.protocol.roster_trust import (
    KEEP_ROSTERS, MAX_VERSION_JUMP, RosterHistory, RosterRefused, ShareIndexBook, swap_reason,
)

TOP = 2**63 - 1  # the largest version a roster can carry (STORED_INT)


def _nodes(prefix: str = "n") -> tuple[list[NodeIdentity], list[PrePublicKey]]:
    return ([NodeIdentity.generate(i, f"{prefix}{i}") for i in range(3)],
            [PreKeyPair.generate().public for _ in range(3)])


def _payload(op: SigningKey, ids: list[NodeIdentity], pres: list[PrePublicKey],
             version: int) -> bytes:
    return build_roster(op, [i.entry() for i in ids], pres, version)


def _at(identity: NodeIdentity, index: int, node_id: str | None = None) -> NodeIdentity:
    """The same node keys presented at another share index (entry re-signed by the node)."""
    return NodeIdentity(index, node_id or identity.node_id, identity.signing, identity.kx)


def _unpinned(payload: bytes) -> NodeRoster:
    """Test helper: parse a roster against whatever key signed it (never done in the code)."""
    return parse_roster(payload, VerifyKey(decode(payload, "node_roster")["operator"]))


# --- jobs pinned to a roster (M4) ---------------------------------------------------------


def test_history_keeps_accepted_rosters_by_digest_across_restarts(tmp_path: Path) -> None:
    """A result names the digest of the roster its job ran on; a receiver finds that roster
    (one it accepted itself) after a swap, and after a restart, but never one it did not."""
    op = SigningKey.generate()
    ids, pres = _nodes()
    spare = NodeIdentity.generate(1, "n1b")
    v1 = _payload(op, ids, pres, 1)
    v2 = _payload(op, [ids[0], spare, ids[2]], pres, 2)
    state = tmp_path / "roster-history.json"
    h = RosterHistory(op.verify_key, state)
    r1, r2 = h.accept(v1), h.accept(v2)
    assert r1.digest != r2.digest
    assert h.by_digest(r1.digest) == r1 and h.by_digest(r2.digest) == r2
    again = RosterHistory(op.verify_key, state)
    assert again.by_digest(r1.digest).node_ids == ("n0", "n1", "n2")
    assert again.by_digest(r2.digest).node_ids == ("n0", "n1b", "n2")
    # not accepted (another operator's roster over the same node keys): not known
    other = RosterHistory(SigningKey.generate().verify_key, state)
    assert other.by_digest(r1.digest) is None
    # a bounded memory: the oldest are dropped
    h2 = RosterHistory(op.verify_key)
    first = h2.accept(_payload(op, ids, pres, 1))
    for v in range(2, KEEP_ROSTERS + 3):
        h2.accept(_payload(op, [ids[0], NodeIdentity.generate(1, f"s{v}"), ids[2]], pres, v))
    assert h2.by_digest(first.digest) is None


def test_swap_reason_names_what_changed() -> None:
    op = SigningKey.generate()
    ids, pres = _nodes("node")
    v1 = _unpinned(_payload(op, ids, pres, 1))
    assert swap_reason(v1, _unpinned(_payload(op, ids, pres, 2))) is None  # same nodes
    swapped = _unpinned(_payload(op, [ids[0], NodeIdentity.generate(1, "node1b"), ids[2]], pres, 2))
    assert swap_reason(v1, swapped) == (
        "node roster changed to version 2 during the job: index 1 node1 -> node1b; "
        "re-grant processing and resubmit")
    rekeyed = _unpinned(_payload(op, [NodeIdentity.generate(0, "node0"), ids[1], ids[2]], pres, 3))
    assert "index 0 node0 has new keys" in swap_reason(v1, rekeyed)
    new_pre = _unpinned(_payload(op, ids, [pres[0], pres[1], PreKeyPair.generate().public], 3))
    assert "index 2 node2 has new keys" in swap_reason(v1, new_pre)


# --- unpinned rosters ----------------------------------------------------------------------


def test_parse_roster_without_an_operator_key_is_refused() -> None:
    cloud_key = SigningKey.generate()  # the cloud signs its own roster with its own nodes
    ids, pres = _nodes("evil")
    with pytest.raises(ValidationError, match="operator key"):
        parse_roster(_payload(cloud_key, ids, pres, 2), None)  # type: ignore[arg-type]


def test_principals_refuse_to_follow_rosters_without_an_operator_key() -> None:
    bus = BusClient("127.0.0.1", 1, client_id="never-connects", prefix="ct/unused")
    ids, _ = _nodes()
    with pytest.raises(ValidationError, match="operator key"):
        RosterHistory(None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="operator key"):
        ProcessingNode(bus, ids[0], PreKeyPair.generate(), operator=None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="operator key"):
        ResultReceiver(bus, "r", X25519KeyPair.generate(), operator=None)  # type: ignore[arg-type]


async def test_owner_cannot_fetch_a_roster_without_an_operator_key() -> None:
    bus = BusClient("127.0.0.1", 1, client_id="never-connects", prefix="ct/unused")
    with pytest.raises(ValidationError, match="operator key"):
        await fetch_roster(bus, None)  # type: ignore[arg-type]


async def test_roster_signed_by_the_cloud_is_ignored_by_nodes_cloud_receiver_and_owner() -> None:
    async with AsyncExitStack() as stack:
        w = await start_world(stack, pool_workers=1)
        real = w.roster
        evil_key = SigningKey.generate()
        evil_ids, evil_pres = _nodes("evil")
        forged = _payload(evil_key, evil_ids, evil_pres, 2)
        # a cloud that was started without any operator key follows no roster at all
        unpinned_jobs = JobManager(w.cloud)
        with structlog.testing.capture_logs() as logs:
            # published retained with the cloud's own connection (its ACL allows it)
            await w.cloud.bus.publish(w.cloud.bus.topics.config_nodes(), forged, retain=True)
            await unpinned_jobs._on_roster(w.cloud.topics.config_nodes(), forged, True)
            # the real operator's next roster (v2) comes after it on the same topic
            await _publish_and_wait(w, w.operator, [n.identity for n in w.nodes],
                                    [n.pre.public for n in w.nodes], 2)
        assert unpinned_jobs.roster is None
        rejected = [e for e in logs if e["event"].endswith("roster_rejected")]
        assert len(rejected) >= 5  # three nodes, the cloud's jobs, the receiver (+ unpinned)
        assert all("operator key" in e["reason"] for e in rejected)
        for roster in _rosters_of(w):
            assert roster.version == 2 and roster.node_keys == real.node_keys
        # the forged roster is retained again: an owner pinned to the operator finds none,
        # so grant-processing never re-keys a share to the cloud's nodes
        await w.cloud.bus.publish(w.cloud.bus.topics.config_nodes(), forged, retain=True)
        owner_bus = await stack.enter_async_context(w.client("owner"))
        with pytest.raises(ValidationError, match="no valid node roster"):
            await fetch_roster(owner_bus, RosterHistory(w.operator.verify_key), timeout=1.0)


# --- versions --------------------------------------------------------------------------


def test_version_jump_is_refused_and_the_next_real_roster_accepted() -> None:
    op = SigningKey.generate()
    ids, pres = _nodes()
    history = RosterHistory(op.verify_key)
    assert history.accept(_payload(op, ids, pres, 1)).version == 1
    with pytest.raises(RosterRefused, match="jumps more than"):
        history.accept(_payload(op, ids, pres, TOP))
    assert history.accept(_payload(op, ids, pres, 2)).version == 2
    with pytest.raises(RosterRefused, match="jumps more than"):
        history.accept(_payload(op, ids, pres, 2 + MAX_VERSION_JUMP + 1))
    assert history.accept(_payload(op, ids, pres, 2 + MAX_VERSION_JUMP)).version == 1002


def test_replayed_older_roster_and_a_same_version_fork_are_refused() -> None:
    op = SigningKey.generate()
    ids, pres = _nodes()
    v1, v2 = _payload(op, ids, pres, 1), _payload(op, ids, pres, 2)
    history = RosterHistory(op.verify_key)
    history.accept(v1)
    history.accept(v2)
    with pytest.raises(RosterRefused, match="not newer"):
        history.accept(v1)  # the broker replays the older retained roster
    fresh_ids, fresh_pres = _nodes("m")
    fork = _payload(op, [ids[0], ids[1], _at(fresh_ids[2], 2)], [*pres[:2], fresh_pres[2]], 2)
    with pytest.raises(RosterRefused, match="not newer"):
        history.accept(fork)
    assert history.accept(v2).version == 2  # the retained re-delivery of what we follow


async def test_operator_signed_version_jump_is_refused_by_every_party() -> None:
    async with AsyncExitStack() as stack:
        w = await start_world(stack, pool_workers=1)
        keys = ([n.identity for n in w.nodes], [n.pre.public for n in w.nodes])
        with structlog.testing.capture_logs() as logs:
            op_bus = await stack.enter_async_context(w.client("operator"))
            await op_bus.publish(op_bus.topics.config_nodes(), _payload(w.operator, *keys, TOP),
                                 retain=True)
            await _publish_and_wait(w, w.operator, *keys, 2)
        assert sum("jumps more than" in e.get("reason", "") for e in logs) == 5
        assert all(r.version == 2 for r in _rosters_of(w)) and all(n.active for n in w.nodes)


# --- share indices ---------------------------------------------------------------------


def _moves(ids: list[NodeIdentity], pres: list[PrePublicKey]
           ) -> dict[str, tuple[list[NodeIdentity], list[PrePublicKey]]]:
    """Rosters (for v2) that each give one identity of node 0 the share index 1."""
    new_ids, new_pres = _nodes("m")
    return {
        "swap": ([_at(ids[1], 0), _at(ids[0], 1), ids[2]], [pres[1], pres[0], pres[2]]),
        "signing key": ([new_ids[0], _at(ids[0], 1, "m1"), ids[2]],
                        [new_pres[0], new_pres[1], pres[2]]),
        "node id": ([new_ids[0], NodeIdentity(1, ids[0].node_id, new_ids[1].signing, new_ids[1].kx),
                     ids[2]], [new_pres[0], new_pres[1], pres[2]]),
        "PRE key": ([new_ids[0], new_ids[1], ids[2]], [new_pres[0], pres[0], pres[2]]),
    }


@pytest.mark.parametrize("moved", ["swap", "signing key", "node id", "PRE key"])
def test_roster_moving_a_node_to_another_share_index_is_refused(moved: str,
                                                                tmp_path: Path) -> None:
    op = SigningKey.generate()
    ids, pres = _nodes()
    state = tmp_path / "roster-history.json"
    RosterHistory(op.verify_key, state).accept(_payload(op, ids, pres, 1))
    later = _payload(op, *_moves(ids, pres)[moved], 2)
    with pytest.raises(RosterRefused, match="no node may hold two shares"):
        RosterHistory(op.verify_key, state).accept(later)  # after a restart: from the file
    assert RosterHistory(op.verify_key, state).version == 1
    # replacing node 2 by a fresh node (nobody moves) is fine
    new_ids, new_pres = _nodes("m")
    fresh = _payload(op, [ids[0], ids[1], _at(new_ids[2], 2)], [pres[0], pres[1], new_pres[2]], 2)
    assert RosterHistory(op.verify_key, state).accept(fresh).version == 2


def test_one_pre_key_at_two_indices_of_one_roster_is_refused() -> None:
    op = SigningKey.generate()
    ids, pres = _nodes()
    with pytest.raises(RosterRefused, match="no node may hold two shares"):
        RosterHistory(op.verify_key).accept(_payload(op, ids, [pres[0], pres[0], pres[2]], 1))


async def test_roster_moving_node_keys_is_refused_by_every_party_and_the_owner() -> None:
    async with AsyncExitStack() as stack:
        w = await start_world(stack, pool_workers=1)
        ids, pres = [n.identity for n in w.nodes], [n.pre.public for n in w.nodes]
        owners = await stack.enter_async_context(w.client("owners"))
        await owners.subscribe(owners.topics.filter("replies"), None)
        await add_owners(w, ["u1"], epoch_policy(4, 1), owners, time.time())
        phone = w.phones["u1"]
        await _grant(w, phone, owners, w.roster)
        installed = {g.grant_id for n in w.roster.node_ids
                     for g in w.cloud.grants.of_receiver(n, "u1")}
        assert len(installed) == 3
        swapped = _payload(w.operator, [_at(ids[1], 0), _at(ids[0], 1), ids[2]],
                           [pres[1], pres[0], pres[2]], 2)
        # the owner is shown the swapped roster (operator-signed): it re-keys nothing
        with pytest.raises(RosterRefused, match="no node may hold two shares"):
            await _grant(w, phone, owners, _unpinned(swapped))
        assert {g.grant_id for n in w.roster.node_ids
                for g in w.cloud.grants.of_receiver(n, "u1")} == installed
        with structlog.testing.capture_logs() as logs:
            await owners.publish(owners.topics.config_nodes(), swapped, retain=True)
            await _publish_and_wait(w, w.operator, ids, pres, 3)
        assert sum("no node may hold two shares" in e.get("reason", "") for e in logs) == 5
        assert all(r.node_keys == w.roster.node_keys for r in _rosters_of(w))


async def _grant(w, phone, bus: BusClient, roster: NodeRoster) -> None:
    await grant_processing(bus, phone.owner, phone.owner_pre, phone.owner_sig, roster, ["u1"],
                           "type:location", granted=phone.granted, function_classes=["proximity"],
                           receiver_keys=[w.receiver_key.public_bytes], timeout=30)


def test_owner_share_book_survives_a_restart(tmp_path: Path) -> None:
    op = SigningKey.generate()
    ids, pres = _nodes()
    book = tmp_path / "granted-shares.json"
    ShareIndexBook(book).record(_unpinned(_payload(op, ids, pres, 1)))
    assert book.stat().st_mode & 0o077 == 0
    moved = _unpinned(_payload(op, *_moves(ids, pres)["PRE key"], 2))
    with pytest.raises(RosterRefused):
        ShareIndexBook(book).record(moved)


# --- configuration and CLI ---------------------------------------------------------------


@pytest.fixture
def no_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIPHERTWIN_PROCESSING__OPERATOR_KEY", raising=False)
    monkeypatch.delenv("CIPHERTWIN_CONFIG", raising=False)


@pytest.mark.parametrize("command", [
    ["node", "--index", "0", "--name", "n0"],
    ["owner", "grant-processing", "--name", "o", "--twins", "t", "--subset", "type:x",
     "--receiver-key", "r.key"],
    ["receiver", "results", "--name", "r", "--job", "j"],
    ["cloud"],
])
def test_cli_without_an_operator_key_fails_with_a_clear_message(
        command: list[str], tmp_path: Path, no_operator_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "deployment.toml"
    config.write_text('[principals]\ncredentials_file = "clients.json"\n')
    home = [] if command == ["cloud"] else ["--home", str(tmp_path / "home")]
    assert main([*command, *home, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no operator key" in err and "operator_key" in err and "--operator-key" in err


def test_operator_init_key_is_encrypted_and_pinned_from_config_env_or_flag(
        tmp_path: Path, no_operator_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CIPHERTWIN_PASSPHRASE", "operator passphrase for the test")
    config = tmp_path / "deployment.toml"
    config.write_text('[principals]\ncredentials_file = "clients.json"\nhash_iterations = 1000\n'
                      '[processing]\noperator_key = "home/operator/public.key"\n')
    home = tmp_path / "home" / "operator"
    assert main(["operator", "init", "--name", "operator", "--home", str(home),
                 "--config", str(config)]) == 0
    assert 'operator_key = "' in capsys.readouterr().out
    assert is_encrypted(home) and (home / "secret.key").stat().st_mode & 0o077 == 0
    op = load_identity(home, "operator passphrase for the test")
    assert op.role == "operator"
    assert pinned_operator(None, load_deployment(config)) == op.signing.verify_key
    other = Identity.generate("other", "operator")
    save_identity(other, tmp_path / "other", None, allow_plaintext=True)
    monkeypatch.setenv("CIPHERTWIN_PROCESSING__OPERATOR_KEY", str(tmp_path / "other"))
    assert pinned_operator(None, load_deployment(config)) == other.signing.verify_key
    flag = str(home / "public.key")  # --operator-key wins over the environment
    assert pinned_operator(flag, load_deployment(config)) == op.signing.verify_key


# --- helpers ---------------------------------------------------------------------------


def _rosters_of(w) -> list[NodeRoster]:
    return [*(n.roster for n in w.nodes), w.cloud.jobs.roster, w.receiver.roster]


async def _publish_and_wait(w, op: SigningKey, ids: list[NodeIdentity],
                            pres: list[PrePublicKey], version: int) -> None:
    """Publish a real roster (retained) and wait until every party follows it."""
    async with w.client("operator") as bus:
        await bus.publish(bus.topics.config_nodes(), _payload(op, ids, pres, version), retain=True)
    for _ in range(250):
        if all(r is not None and r.version == version for r in _rosters_of(w)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"roster v{version} did not reach every party: "
                         f"{[r.version if r else None for r in _rosters_of(w)]}")


def test_operator_cli_publishes_rosters_and_refuses_jumps_moves_and_other_signers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config = tmp_path / "deployment.toml"
    config.write_text(f'[broker]\nport = {port}\nprefix = "ct/roster{os.urandom(3).hex()}"\n'
                      '[principals]\ncredentials_file = "clients.json"\nhash_iterations = 1000\n'
                      '[processing]\noperator_key = "home/operator/public.key"\n')
    monkeypatch.setenv("CIPHERTWIN_CONFIG", str(config))
    monkeypatch.setenv("CIPHERTWIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CIPHERTWIN_PASSPHRASE", "a passphrase for the roster test")
    monkeypatch.delenv("CIPHERTWIN_PROCESSING__OPERATOR_KEY", raising=False)
    assert main(["operator", "init", "--name", "operator"]) == 0
    assert main(["owner", "init", "--name", "mallory"]) == 0
    entries: dict[tuple[int, int], str] = {}
    for i in range(3):
        assert main(["node", "init", "--name", f"node{i}"]) == 0
        for index in {i, 1 - i if i < 2 else i}:  # node0 and node1 also sign swapped entries
            entries[i, index] = str(tmp_path / f"node{i}-at-{index}.entry")
            assert main(["node", "entry", "--name", f"node{i}", "--index", str(index),
                         "--out", entries[i, index]]) == 0
    capsys.readouterr()

    def publish(name: str, *extra: str, layout=((0, 0), (1, 1), (2, 2))) -> tuple[int, str]:
        files = [a for key in layout for a in ("--entry", entries[key])]
        code = main(["operator", "publish-roster", "--name", name, "--wait", "1", *files, *extra])
        out = capsys.readouterr()
        return code, out.out + out.err

    broker = subprocess.Popen([sys.executable, "-m", "ciphertwin.cli", "--log-level", "WARNING",
                               "broker", "--config", str(config)])
    try:
        wait_for_port(port)
        code, out = publish("operator")
        assert code == 0 and "roster v1 published: node0, node1, node2" in out
        code, out = publish("mallory")  # an owner's key is not the operator's
        assert code == 2 and "not the operator" in out
        code, out = publish("operator", "--version", str(TOP))
        assert code == 2 and "jumps more than" in out
        code, out = publish("operator", layout=((1, 0), (0, 1), (2, 2)))
        assert code == 2 and "no node may hold two shares" in out
        (tmp_path / "home" / "operator" / "roster-history.json").unlink()
        code, out = publish("operator")  # default version: one above the retained roster
        assert code == 0 and "roster v2 published: node0, node1, node2" in out
    finally:
        broker.terminate()
        broker.wait(10)


