"""Enrollment bundle: round trips, sealing, strict decoding, file modes, device enrolment."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ciphertwin.agents.bundle import (
    DEVICE_CONFIG_FILE,
    BrokerConnection,
    EnrollmentBundle,
    QrUnavailable,
    bundle_qr_png,
    enroll_from_bundle,
    load_enrolled_device,
    open_bundle,
    read_bundle,
    seal_bundle,
    write_bundle,
)
from ciphertwin.agents.sources import Reading
from ciphertwin.agents.identity import load_identity, write_private_file
from ciphertwin.crypto import (
    PreKeyPair,
    SigningKey,
    TokenRejected,
    decrypt_owner,
    encrypt,
    issue_write_token,
    verify_write_token,
)
from ciphertwin.crypto.epochs import KeyEpochPolicy
from ciphertwin.crypto.passwords import Argon2Params
from ciphertwin.errors import ValidationError

FAST = Argon2Params(memory_kib=8, iterations=1, lanes=1)
RULES = [{"when_type": "temperature", "add": ["type:temperature"]},
         {"when": "value > 30", "add": ["alert:hot"]}]
SOURCE = {"kind": "simulated", "sensor": "temperature", "interval_s": 0.5, "seed": 7}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def owner() -> tuple[PreKeyPair, SigningKey]:
    return PreKeyPair.generate(), SigningKey.generate()


@pytest.fixture(scope="module")
def device_keys() -> tuple[PreKeyPair, SigningKey]:
    return PreKeyPair.generate(), SigningKey.generate()


def make(owner: tuple[PreKeyPair, SigningKey], device_keys: tuple[PreKeyPair, SigningKey],
         **over: Any) -> EnrollmentBundle:
    owner_pre, owner_sig = owner
    dev_pre, dev_sig = device_keys
    token = over.pop("write_token", None) or issue_write_token(
        owner_sig, "twin-1", dev_sig.verify_key, ["type:*", "alert:hot", "day:*"],
        valid_for_s=3600)
    fields: dict[str, Any] = dict(
        twin="twin-1", device="dev-1", device_pre=dev_pre, device_signing=dev_sig,
        owner_pre=owner_pre.public, owner_verify=owner_sig.verify_key, write_token=token,
        broker=BrokerConnection(host="broker.example", port=8883, username="dev-1",
                                password="s3cret-broker-pw", prefix="ct/v1", tls=True),
        epoch_policy="hour", rules=RULES, source=SOURCE,
    )
    fields.update(over)
    return EnrollmentBundle(**fields)


@pytest.fixture(scope="module")
def bundle(owner: Any, device_keys: Any) -> EnrollmentBundle:
    return make(owner, device_keys)


def tweak(data: bytes, **changes: Any) -> bytes:
    """Re-encode a wire map with some fields changed (None deletes) — for crafted inputs."""
    obj = msgpack.unpackb(data, raw=False)
    for k, v in changes.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    return msgpack.packb(obj, use_bin_type=True)


def self_signed_pem() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ct test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


# --- bundle encoding -----------------------------------------------------------------------


def test_round_trip_is_canonical_and_complete(bundle: EnrollmentBundle) -> None:
    data = bundle.to_bytes()
    back = EnrollmentBundle.from_bytes(data)
    assert back.to_bytes() == data
    assert (back.twin, back.device, back.epoch_policy, back.rules, back.source) == (
        "twin-1", "dev-1", "hour", RULES, SOURCE)
    assert back.broker == bundle.broker and back.broker.password == "s3cret-broker-pw"
    assert back.owner_pre == bundle.owner_pre and back.owner_verify == bundle.owner_verify
    assert back.device_pre.public == bundle.device_pre.public
    assert back.device_signing.verify_key == bundle.device_signing.verify_key
    assert "s3cret" not in repr(back)  # secrets stay out of logs


def test_token_inside_verifies_against_owner_key(owner: Any, bundle: EnrollmentBundle) -> None:
    token = EnrollmentBundle.from_bytes(bundle.to_bytes()).token
    verify_write_token(token, owner[1].verify_key, twin="twin-1",
                       device_key=bundle.device_signing.verify_key,
                       attributes=["type:temperature", "alert:hot"])
    with pytest.raises(TokenRejected):
        verify_write_token(token, SigningKey.generate().verify_key)


@pytest.mark.parametrize("case", ["other-owner", "other-device", "other-twin"])
def test_token_that_does_not_fit_is_refused(owner: Any, device_keys: Any, case: str) -> None:
    owner_sig, dev_sig = owner[1], device_keys[1]
    signer, twin, dev = owner_sig, "twin-1", dev_sig.verify_key
    if case == "other-owner":
        signer = SigningKey.generate()
    elif case == "other-device":
        dev = SigningKey.generate().verify_key
    else:
        twin = "twin-2"
    token = issue_write_token(signer, twin, dev, ["type:*"], valid_for_s=60)
    with pytest.raises(ValidationError, match="write token"):
        make(owner, device_keys, write_token=token)
    # and the same when the token is swapped inside encoded bytes
    data = tweak(make(owner, device_keys).to_bytes(), token=token.to_bytes())
    with pytest.raises(ValidationError, match="write token"):
        EnrollmentBundle.from_bytes(data)


def test_garbage_and_malformed_bytes(bundle: EnrollmentBundle) -> None:
    good = bundle.to_bytes()
    cases = [b"", b"\xc1", b"not msgpack at all", good[:-3], good[: len(good) // 2],
             tweak(good, v=2), tweak(good, t="write-token"), tweak(good, extra=1),
             tweak(good, rules=None), tweak(good, twin="a/b"), tweak(good, device_pre=b"x" * 40),
             tweak(good, owner_vk=b"\x00" * 31), tweak(good, epoch="fortnight"),
             tweak(good, rules=[{"add": ["x:y"]}]), tweak(good, source={"kind": "rm -rf"}),
             tweak(good, source=[1]), tweak(good, broker={"host": "h"}),
             tweak(good, broker={**bundle.broker.to_map(), "port": 0}),
             tweak(good, broker={**bundle.broker.to_map(), "tls": 1}),
             tweak(good, broker={**bundle.broker.to_map(), "ca": b"not a pem"}),
             b"\x00" * 300_000]
    for bad in cases:
        with pytest.raises(ValidationError):
            EnrollmentBundle.from_bytes(bad)


def test_constructor_validation(owner: Any, device_keys: Any) -> None:
    with pytest.raises(ValidationError, match="epoch"):
        make(owner, device_keys, epoch_policy="fortnight")
    with pytest.raises(ValidationError, match="rule #1"):
        make(owner, device_keys, rules=[{"when_type": "t", "add": ["NOT VALID"]}])
    with pytest.raises(ValidationError, match="source"):
        make(owner, device_keys, source={"sensor": "x"})
    with pytest.raises(ValidationError, match="twin"):
        make(owner, device_keys, twin="#")
    assert make(owner, device_keys, epoch_policy="900s").epoch_policy == "900s"


def test_broker_connection_and_tls_context() -> None:
    pem = self_signed_pem()
    conn = BrokerConnection(host="10.0.0.2", port=8883, username="dev-1", password="pw",
                            tls=True, ca_pem=pem)
    ctx = conn.ssl_context()
    assert ctx is not None and ctx.get_ca_certs()[0]["subject"][0][0][1] == "ct test CA"
    assert BrokerConnection.from_map(conn.to_map()) == conn
    assert BrokerConnection(host="h", port=1883, username="u", password="p").ssl_context() is None
    for bad in (dict(host="", port=1, username="u", password="p"),
                dict(host="h", port=70000, username="u", password="p"),
                dict(host="h", port=1, username="u/x", password="p"),
                dict(host="h", port=1, username="u", password=""),
                dict(host="h", port=1, username="u", password="p", prefix="a/+"),
                dict(host="h", port=1, username="u", password="p", ca_pem=pem),  # tls off
                dict(host="h", port=1, username="u", password="p", tls=True, ca_pem=b"junk")):
        with pytest.raises(ValidationError):
            BrokerConnection(**bad)
    junk_pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    broken = BrokerConnection(host="h", port=1, username="u", password="p", tls=True,
                              ca_pem=junk_pem)
    with pytest.raises(ValidationError, match="unusable"):
        broken.ssl_context()


# --- sealing and files ---------------------------------------------------------------------


def test_seal_open_with_and_without_passphrase(bundle: EnrollmentBundle) -> None:
    sealed = seal_bundle(bundle, "bundle-pw", FAST)
    assert b"s3cret-broker-pw" not in sealed
    assert open_bundle(sealed, "bundle-pw").to_bytes() == bundle.to_bytes()
    with pytest.raises(ValidationError, match="^wrong passphrase or corrupted bundle$"):
        open_bundle(sealed, "nope")
    with pytest.raises(ValidationError, match="passphrase-protected"):
        open_bundle(sealed, None)
    flipped = bytearray(sealed)
    flipped[-5] ^= 0x40
    with pytest.raises(ValidationError):
        open_bundle(bytes(flipped), "bundle-pw")
    plain = seal_bundle(bundle, None, allow_plaintext=True)
    assert open_bundle(plain, None, allow_plaintext=True).to_bytes() == bundle.to_bytes()
    for bad in (b"", b"junk", tweak(plain, protected=1), tweak(plain, body=None),
                tweak(plain, body=b"\x80")):
        with pytest.raises(ValidationError):
            open_bundle(bad, None, allow_plaintext=True)


def test_write_bundle_is_private(tmp_path: Path, bundle: EnrollmentBundle) -> None:
    old = os.umask(0)
    try:
        path = write_bundle(tmp_path / "dev-1.bundle", bundle, "pw", FAST)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert read_bundle(path, "pw").to_bytes() == bundle.to_bytes()
    os.chmod(path, 0o644)  # copied off a USB stick: still readable
    assert read_bundle(path, "pw").device == "dev-1"


def test_qr_without_segno_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              bundle: EnrollmentBundle) -> None:
    monkeypatch.setitem(sys.modules, "segno", None)  # makes "import segno" fail
    with pytest.raises(QrUnavailable, match=r"pip install 'ciphertwin\[qr\]'"):
        bundle_qr_png(seal_bundle(bundle, "pw", FAST), tmp_path / "q.png")
    with pytest.raises(ValidationError, match="QR code holds at most"):
        bundle_qr_png(b"x" * 5000, tmp_path / "q.png")


@pytest.mark.skipif(importlib.util.find_spec("segno") is None,
                    reason="segno (optional extra 'qr') is not installed")
def test_qr_png(tmp_path: Path, bundle: EnrollmentBundle) -> None:
    path = bundle_qr_png(seal_bundle(bundle, "pw", FAST), tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mode(path) == 0o600


# --- device side ---------------------------------------------------------------------------


def test_enroll_and_load(tmp_path: Path, owner: Any, bundle: EnrollmentBundle) -> None:
    home = tmp_path / "dev-1"
    identity = enroll_from_bundle(open_bundle(seal_bundle(bundle, "pw", FAST), "pw"), home)
    assert (identity.name, identity.role, identity.extra) == ("dev-1", "device", {"twin": "twin-1"})
    assert mode(home) == 0o700
    for name in ("secret.key", DEVICE_CONFIG_FILE):
        assert mode(home / name) == 0o600
    cfg = load_enrolled_device(home)
    assert (cfg.twin, cfg.device, cfg.rules, cfg.source) == ("twin-1", "dev-1", RULES, SOURCE)
    assert cfg.epoch_policy == KeyEpochPolicy("hour")
    assert cfg.broker == bundle.broker
    assert cfg.owner_pre == owner[0].public and cfg.owner_verify == owner[1].verify_key
    assert cfg.identity.signing.verify_key == bundle.device_signing.verify_key
    verify_write_token(cfg.write_token, owner[1].verify_key, twin="twin-1",
                       device_key=cfg.identity.signing.verify_key, attributes=["type:x"])
    attrs = cfg.attribute_rules().attributes_for(
        Reading(type="temperature", values={"value": 35.0}, time=time.time()))
    assert {"type:temperature", "alert:hot", "twin:twin-1", "device:dev-1"} <= attrs
    # the device encrypts to the owner's PRE key; the owner can read it
    ct = encrypt(cfg.owner_pre, {"twin:twin-1"}, b"21.5", aad=b"a")
    assert decrypt_owner(owner[0], ct, aad=b"a") == b"21.5"
    with pytest.raises(ValidationError, match="already exists"):
        enroll_from_bundle(bundle, home)
    enroll_from_bundle(bundle, home, overwrite=True)


def test_enrolled_files_are_checked(tmp_path: Path, owner: Any, device_keys: Any,
                                    bundle: EnrollmentBundle) -> None:
    home = tmp_path / "dev"
    enroll_from_bundle(bundle, home)
    cfg_path = home / DEVICE_CONFIG_FILE
    good = cfg_path.read_bytes()
    os.chmod(cfg_path, 0o644)
    with pytest.raises(ValidationError, match="chmod 600"):
        load_enrolled_device(home)
    os.chmod(cfg_path, 0o600)
    # a config belonging to another device (token for another key) does not load
    other = make(owner, (PreKeyPair.generate(), SigningKey.generate()), device="dev-9",
                 broker=BrokerConnection(host="h", port=1883, username="dev-9", password="p"))
    enroll_from_bundle(other, tmp_path / "other")
    write_private_file(cfg_path, (tmp_path / "other" / DEVICE_CONFIG_FILE).read_bytes())
    with pytest.raises(ValidationError, match="is not device"):
        load_enrolled_device(home)
    write_private_file(cfg_path, tweak(good, token=other.write_token))
    with pytest.raises(ValidationError, match="write token"):
        load_enrolled_device(home)
    for bad in (b"", b"junk", tweak(good, extra=1), tweak(good, source={"kind": 1})):
        write_private_file(cfg_path, bad)
        with pytest.raises(ValidationError):
            load_enrolled_device(home)
    write_private_file(cfg_path, good)
    assert load_enrolled_device(home).device == "dev-1"
    assert load_identity(home, None).name == "dev-1"


def test_expired_token_cannot_enroll(tmp_path: Path, owner: Any, device_keys: Any) -> None:
    now = int(time.time())
    token = issue_write_token(owner[1], "twin-1", device_keys[1].verify_key, ["type:*"],
                              not_before=now - 7200, not_after=now - 3600)
    expired = make(owner, device_keys, write_token=token)  # a well-formed bundle …
    with pytest.raises(ValidationError, match="expired"):  # … that is too late to install
        enroll_from_bundle(expired, tmp_path / "d")
    assert not (tmp_path / "d").exists()
