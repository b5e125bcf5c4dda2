"""ciphertwin.crypto — KP-CPRE on BLS12-381, key epochs, Ed25519 tokens, HPKE, Argon2id.

Re-encryption in five lines::

    from ciphertwin.crypto import PreKeyPair, encrypt, rekey, reencrypt, decrypt_receiver
    alice, bob = PreKeyPair.generate(), PreKeyPair.generate()
    ct = encrypt(alice.public, {"type:location", "share:1"}, b"47.07,15.44", aad=b"twin-1")
    rk = rekey(alice, "type:location AND (share:1 OR share:2)", bob.public)  # owner → cloud
    assert decrypt_receiver(bob, reencrypt(rk, ct), aad=b"twin-1") == b"47.07,15.44"

``reencrypt`` runs at the (untrusted) cloud; if the ciphertext's attributes do not satisfy the
policy it raises ``PolicyNotSatisfied`` and produces nothing.  See docs/crypto.md for the
construction, the security argument and the code ↔ math map.
"""

from ciphertwin.crypto.epochs import (
    DataKeyManager,
    KeyEpochPolicy,
    SealedItem,
    open_sealed,
    seal_with_key,
)
from ciphertwin.crypto.errors import (
    DecryptionFailed,
    KeyMismatch,
    PolicyNotSatisfied,
    PolicySyntaxError,
    SignatureInvalid,
    TokenRejected,
)
from ciphertwin.crypto.hpke import X25519KeyPair, hpke_open, hpke_seal
from ciphertwin.crypto.kpcpre import (
    Capsule,
    PreCiphertext,
    PreKeyPair,
    PrePublicKey,
    ReCapsule,
    ReEncryptedCiphertext,
    ReKey,
    decapsulate_owner,
    decapsulate_receiver,
    decrypt_owner,
    decrypt_receiver,
    encapsulate,
    encrypt,
    reencrypt,
    rekey,
)
from ciphertwin.crypto.passwords import (
    Argon2Params,
    decrypt_with_passphrase,
    derive_key,
    encrypt_with_passphrase,
)
from ciphertwin.crypto.policy import Policy, validate_attribute, validate_attributes
from ciphertwin.crypto.shares import combine_additive, decode_fixed, encode_fixed, split_additive
from ciphertwin.crypto.signing import SigningKey, VerifyKey, canonical
from ciphertwin.crypto.tokens import (
    ProcessToken,
    WriteToken,
    issue_process_token,
    issue_write_token,
    roster_digest,
    verify_process_token,
    verify_write_token,
)
from ciphertwin.crypto.wire import decode_any

__all__ = [
    "Argon2Params",
    "Capsule",
    "DataKeyManager",
    "DecryptionFailed",
    "KeyEpochPolicy",
    "KeyMismatch",
    "Policy",
    "PolicyNotSatisfied",
    "PolicySyntaxError",
    "PreCiphertext",
    "PreKeyPair",
    "PrePublicKey",
    "ProcessToken",
    "ReCapsule",
    "ReEncryptedCiphertext",
    "ReKey",
    "SealedItem",
    "SignatureInvalid",
    "SigningKey",
    "TokenRejected",
    "VerifyKey",
    "WriteToken",
    "X25519KeyPair",
    "canonical",
    "combine_additive",
    "decapsulate_owner",
    "decapsulate_receiver",
    "decode_any",
    "decode_fixed",
    "decrypt_owner",
    "decrypt_receiver",
    "decrypt_with_passphrase",
    "derive_key",
    "encapsulate",
    "encode_fixed",
    "encrypt",
    "encrypt_with_passphrase",
    "hpke_open",
    "hpke_seal",
    "issue_process_token",
    "issue_write_token",
    "open_sealed",
    "reencrypt",
    "rekey",
    "roster_digest",
    "seal_with_key",
    "split_additive",
    "validate_attribute",
    "validate_attributes",
    "verify_process_token",
    "verify_write_token",
]
