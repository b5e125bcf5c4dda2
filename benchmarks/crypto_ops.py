"""Benchmark of the cryptographic core, shaped like Table 2 of the paper.

Usage::

    .venv/bin/python benchmarks/crypto_ops.py            # table
    .venv/bin/python benchmarks/crypto_ops.py --json     # {"pre_enc": {"median_ms": …}, …}
    .venv/bin/python benchmarks/crypto_ops.py --runs 50  # quicker

Each operation is timed call by call (time.perf_counter_ns) after a warm-up; the figure is the
median over the runs, on one core (the code is single-threaded).  Inputs are what the platform
really handles: a location reading of ~64 bytes, attributes like ``type:location``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ciphertwin.crypto import pairing  # noqa: E402
from ciphertwin.crypto import (  # noqa: E402
    DataKeyManager,
    KeyEpochPolicy,
    PreKeyPair,
    PrePublicKey,
    ReCapsule,
    ReKey,
    SigningKey,
    decrypt_owner,
    decrypt_receiver,
    encode_fixed,
    encrypt,
    open_sealed,
    reencrypt,
    rekey,
    split_additive,
)

# operation key -> (paper figure in ms and where it was measured, Must target, Aim target)
PAPER = {
    "pre_keygen": (None, None, None),
    "pre_rekey": ((53.98, "phone"), 6.0, None),
    "pre_enc": ((51.13, "phone"), 3.0, 1.5),
    "pre_reenc": ((4.52, "PC"), 4.0, 2.0),
    "pre_dec_owner": ((2.35, "PC"), 2.0, None),
    "pre_dec_receiver": ((2.35, "PC"), 2.0, None),
    "sig_sign": ((1.44, "phone"), 0.2, None),
    "sig_verify": ((0.19, "PC"), 0.3, None),
    "aes_enc_item": (None, None, None),
    "aes_dec_item": (None, None, None),
    "mpc_split": (None, None, None),
}
LABELS = {
    "pre_keygen": "PRE.KeyGen",
    "pre_rekey": "PRE.RKGen (3-leaf AND policy)",
    "pre_enc": "PRE.Enc (2 attributes, 64 B item)",
    "pre_reenc": "PRE.ReEnc (2-leaf AND policy)",
    "pre_dec_owner": "PRE.Dec owner (2nd level)",
    "pre_dec_receiver": "PRE.Dec receiver (1st level)",
    "sig_sign": "SIG.Sign (Ed25519, 200 B)",
    "sig_verify": "SIG.Verify",
    "aes_enc_item": "AES-GCM seal item in epoch",
    "aes_dec_item": "AES-GCM open item",
    "mpc_split": "MPC split (epoch,x,y) in 3",
}
EXTRA_LABELS = {
    "pre_reenc_or": "PRE.ReEnc (2-leaf OR policy)",
    "pre_reenc_2of3": "PRE.ReEnc (2 of 3 threshold)",
    "pk_import": "PRE public key import (check)",
    "rekey_parse": "ReKey parse (3 leaves)",
    "recapsule_parse": "ReCapsule parse (GT check)",
}


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(max(3, runs // 10)):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e6


def measure(runs: int) -> tuple[dict[str, float], dict[str, float]]:
    owner, receiver = PreKeyPair.generate(), PreKeyPair.generate()
    attrs = {"type:location", "share:1"}
    item = b'{"lat":47.070714,"lon":15.439504,"t":1795000000,"acc":4.5}'.ljust(64)
    aad = b"twin-1|device-7|seq-42"
    ct = encrypt(owner.public, attrs, item, aad)
    rk_and = rekey(owner, "type:location AND share:1", receiver.public)
    rk_or = rekey(owner, "type:location OR share:2", receiver.public)
    rk_thr = rekey(owner, "2 of (type:location, share:1, day:2026-11-22)", receiver.public)
    rct = reencrypt(rk_and, ct)
    signer = SigningKey.generate()
    envelope = bytes(200)
    signature = signer.sign("envelope", envelope)
    at = datetime(2026, 11, 22, 10, tzinfo=timezone.utc)
    mgr = DataKeyManager(owner.public, KeyEpochPolicy("day"))
    capsule, sealed = mgr.seal(item, attrs, aad, at=at)
    from ciphertwin.crypto import decapsulate_owner

    data_key = decapsulate_owner(owner, capsule)
    fast, slow = runs * 10, runs

    main = {
        "pre_keygen": median_ms(PreKeyPair.generate, slow),
        "pre_rekey": median_ms(
            lambda: rekey(owner, "type:location AND share:1 AND day:2026-11-22", receiver.public),
            slow,
        ),
        "pre_enc": median_ms(lambda: encrypt(owner.public, attrs, item, aad), slow),
        "pre_reenc": median_ms(lambda: reencrypt(rk_and, ct), slow),
        "pre_dec_owner": median_ms(lambda: decrypt_owner(owner, ct, aad), slow),
        "pre_dec_receiver": median_ms(lambda: decrypt_receiver(receiver, rct, aad), slow),
        "sig_sign": median_ms(lambda: signer.sign("envelope", envelope), fast),
        "sig_verify": median_ms(
            lambda: signer.verify_key.verify("envelope", envelope, signature), fast
        ),
        "aes_enc_item": median_ms(lambda: mgr.seal(item, attrs, aad, at=at), fast),
        "aes_dec_item": median_ms(lambda: open_sealed(sealed, data_key, aad), fast),
        "mpc_split": median_ms(
            lambda: split_additive(
                [encode_fixed(1795000000 // 60, 0), encode_fixed(47.070714, 20),
                 encode_fixed(15.439504, 20)]
            ),
            fast,
        ),
    }
    pk_raw, rk_raw, rc_raw = owner.public.to_bytes(), rk_thr.to_bytes(), rct.recapsule.to_bytes()
    extra = {
        "pre_reenc_or": median_ms(lambda: reencrypt(rk_or, ct), slow),
        "pre_reenc_2of3": median_ms(lambda: reencrypt(rk_thr, ct), slow),
        "pk_import": median_ms(lambda: PrePublicKey.from_bytes(pk_raw), slow),
        "rekey_parse": median_ms(lambda: ReKey.from_bytes(rk_raw), slow),
        "recapsule_parse": median_ms(lambda: ReCapsule.from_bytes(rc_raw), slow),
    }
    return main, extra


def table(main: dict[str, float], extra: dict[str, float], runs: int) -> str:
    head = (f"{'operation':<34} {'ours ms':>9} {'paper ms':>14} {'paper/ours':>10}"
            f" {'Must':>6} {'Aim':>6}  status")
    lines = [
        f"ciphertwin crypto core — BLS12-381 (pymcl), median of {runs}+ runs, one core",
        f"python {platform.python_version()} on {platform.machine()}; multi-pairing "
        f"(shared final exponentiation): {'on' if pairing.MULTI_PAIRING else 'OFF (fallback)'}",
        "",
        head,
        "-" * len(head),
    ]
    for key, ours in main.items():
        paper, must, aim = PAPER[key]
        paper_txt = f"{paper[0]:.2f} ({paper[1]})" if paper else "—"
        ratio = f"{paper[0] / ours:.0f}×" if paper else "—"
        status = ""
        if must is not None:
            status = "ok" if ours <= must else "MISSES MUST"
            if aim is not None:
                status += ", aim ok" if ours <= aim else ", aim missed"
        lines.append(
            f"{LABELS[key]:<34} {ours:>9.3f} {paper_txt:>14} {ratio:>10}"
            f" {must if must else '—':>6} {aim if aim else '—':>6}  {status}"
        )
    lines.append("")
    lines.append("extra (not in the paper's table):")
    for key, ours in extra.items():
        lines.append(f"{EXTRA_LABELS[key]:<34} {ours:>9.3f}")
    lines.append("")
    lines.append("paper: RELIC; Enc/RKGen/Sign on a OnePlus 6T phone, ReEnc/Dec/Verify on a "
                 "Ryzen 5600X PC. Ratio = paper / ours.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object only")
    parser.add_argument("--runs", type=int, default=300, help="runs per pairing operation")
    args = parser.parse_args()
    main_figures, extra = measure(max(5, args.runs))
    if args.json:
        print(json.dumps({k: {"median_ms": round(v, 4)} for k, v in main_figures.items()}))
    else:
        print(table(main_figures, extra, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
