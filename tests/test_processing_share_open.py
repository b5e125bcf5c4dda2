"""Node-side opening of share items: what is accepted and what is refused (docs/processing.md,
"Authenticity of node inputs"); the cloud's forgeries are in test_security_process_tokens.py."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.agents.attribute_rules import time_attributes
from ciphertwin.bus.envelope import encode
from ciphertwin.crypto.epochs import DataKeyManager, KeyEpochPolicy, SealedItem, seal_with_key
from ciphertwin.crypto.kpcpre import Capsule, PreKeyPair, decapsulate_owner, reencrypt, rekey
from ciphertwin.crypto.shares import split_additive
from ciphertwin.crypto.signing import SigningKey
from ciphertwin.crypto.tokens import issue_write_token
from ciphertwin.crypto.wire import canonical
from ciphertwin.protocol.items import DeviceCredentials, build_item, decode_item, item_aad
from ciphertwin.protocol.job_epochs import FieldEncoding
from ciphertwin.protocol.share_open import OpenedColumns, open_share_batch

METRES = FieldEncoding("m", 4, -50_000.0, 50_000.0)
JOB_FIELDS = {"x": METRES.as_dict(), "y": METRES.as_dict()}


def share_readings(values: dict[str, float], when: float, enc: dict[str, object]
                   ) -> list[tuple[dict, tuple[str, ...]]]:
    """The share reading format straight from the brief: {type, time, share, enc, values},
    each field encoded as round(v · 2^frac) and split additively; ``enc`` is what the device
    declares (possibly not what the job declares)."""
    names = sorted(values)
    columns = split_additive([METRES.encode(values[n]) for n in names], 3)
    attrs = {"twin:u1", "device:d1", "type:location", *time_attributes(when)}
    return [({"type": "location", "time": when, "share": i, "enc": enc,
              "values": dict(zip(names, col, strict=True))}, tuple(sorted(attrs | {f"share:{i}"})))
            for i, col in enumerate(columns)]


class Setup:
    def __init__(self, enc: dict[str, object] | None = None, edit=lambda r: r) -> None:
        self.owner_pre, self.owner_sig = PreKeyPair.generate(), SigningKey.generate()
        self.node = PreKeyPair.generate()
        dev = SigningKey.generate()
        token = issue_write_token(self.owner_sig, "u1", dev.verify_key,
                                  ["twin:u1", "device:d1", "type:*", "year:*", "month:*",
                                   "day:*", "hour:*", "share:*"], device="d1",
                                  valid_for_s=3600)
        self.creds = DeviceCredentials("u1", "d1", dev, token.to_bytes())
        self.keys = DataKeyManager(self.owner_pre.public, KeyEpochPolicy("day"))
        self.items = [build_item(self.creds, self.keys, seq, edit(body), attrs)
                      for seq, (body, attrs) in enumerate(share_readings(
                          {"x": 1.5, "y": 2.0}, time.time(),
                          JOB_FIELDS if enc is None else enc), start=1)]
        self.rk = rekey(self.owner_pre, "share:0 AND type:location", self.node.public)
        self.capsule = Capsule.from_bytes(decode_item(self.items[0])["capsule"])
        self.recapsule = reencrypt(self.rk, self.capsule).to_bytes()

    def open(self, item: bytes) -> object:
        return open_share_batch(
            self.node.to_bytes(), 0, {"u1": self.owner_sig.verify_key.raw},
            {self.owner_sig.verify_key.raw: "type:location"}, JOB_FIELDS,
            [{"item": item, "key": self.recapsule}])

    def resealed(self, reading: dict) -> bytes:
        """An item share 0 re-sealed under the epoch key by someone who holds it (the owner
        or a grantee of share-0 items), with a signature the device never made."""
        body = dict(decode_item(self.items[0]).body)
        key = decapsulate_owner(self.owner_pre, self.capsule)
        inner = canonical({"reading": reading, "sig": bytes(64)})
        attrs = tuple(body["attrs"])
        sealed = seal_with_key(key, self.capsule.capsule_id, b"\x00" * 11 + b"\x09", inner,
                               item_aad("u1", "d1", body["seq"], attrs))
        body["sealed"] = sealed.to_bytes()
        return encode("item", body)


def test_node_opens_its_share_and_refuses_others() -> None:
    s = Setup()
    opened = s.open(s.items[0])
    assert isinstance(opened, OpenedColumns) and len(opened) == 1, opened
    # share 1 is not node 0's, whatever key material comes with it
    assert isinstance(s.open(s.items[1]), str)


def test_tampered_ciphertext_is_refused() -> None:
    s = Setup()
    body = dict(decode_item(s.items[0]).body)
    sealed = SealedItem.from_bytes(body["sealed"])
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    body["sealed"] = SealedItem(sealed.capsule_id, sealed.nonce, flipped).to_bytes()
    assert isinstance(s.open(encode("item", body)), str)


def test_signature_check_catches_a_key_holder_resealing_inputs() -> None:
    s = Setup()
    forged = dict(decode_item(s.items[0]).body)
    reading = {"type": "location", "time": forged["time"], "share": 0,
               "enc": JOB_FIELDS, "values": {"x": 7, "y": 7}}
    refused = s.open(s.resealed(reading))
    assert isinstance(refused, str) and "Signature" in refused


def test_reading_encoded_otherwise_than_the_job_declares_is_refused() -> None:
    """Unit, scale or range differing from the job's: the node refuses, naming the field."""
    for other in (FieldEncoding("mm", 4, -50_000.0, 50_000.0), FieldEncoding("m", 3, -50_000.0, 50_000.0),
                  FieldEncoding("m", 4, -60_000.0, 50_000.0)):
        s = Setup({"x": other.as_dict(), "y": METRES.as_dict()})
        refused = s.open(s.items[0])
        assert isinstance(refused, str) and "field 'x' is encoded as" in refused, refused
        assert "the job declares 'm' frac 4 in [-50000, 50000]" in refused


def test_old_frac_readings_and_malformed_encodings_are_refused() -> None:
    s = Setup({"x": METRES.as_dict()})  # y undeclared
    assert "field 'y' is encoded as nothing" in s.open(s.items[0])
    s = Setup({"x": {**METRES.as_dict(), "frac": True}, "y": METRES.as_dict()})  # True == 1 in Python
    assert "field 'x' is encoded as something malformed" in s.open(s.items[0])
    s = Setup({"x": {**METRES.as_dict(), "extra": 1}, "y": METRES.as_dict()})
    assert "field 'x'" in s.open(s.items[0])
    s = Setup({"x": 16, "y": 16})
    assert isinstance(s.open(s.items[0]), str)


def test_old_frac_format_is_refused() -> None:
    def old(reading: dict) -> dict:  # {type, time, share, frac, values}: the format before
        return {k: v for k, v in reading.items() if k != "enc"} | {"frac": {"x": 4, "y": 4}}

    s = Setup(edit=old)
    refused = s.open(s.items[0])
    assert isinstance(refused, str) and "old 'frac' format is no longer accepted" in refused


def test_integer_range_bounds_equal_their_float_form() -> None:
    """Dict equality after FieldEncoding.from_dict: min 0 and min 0.0 are the same encoding."""
    s = Setup({"x": {"unit": "m", "frac": 4, "min": -50_000, "max": 50_000}, "y": METRES.as_dict()})
    assert isinstance(s.open(s.items[0]), OpenedColumns)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80), st.integers(0, 2**64 - 1),
       st.lists(st.text(max_size=300), max_size=40))
def test_item_aad_fast_packing_equals_canonical(twin: str, device: str, seq: int,
                                                attrs: list[str]) -> None:
    """item_aad packs directly (faster); it must stay byte-identical to the canonical form."""
    assert item_aad(twin, device, seq, attrs) == canonical(["ct/item", twin, device, seq, attrs])
