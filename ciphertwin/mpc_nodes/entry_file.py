"""The node entry file: what ``node entry`` hands the operator for ``publish-roster``.

It holds the node's self-signed MPC roster entry (index, id, Ed25519, X25519) and its PRE
public key, and the node's Ed25519 signature over both — the roster entry alone does not
cover the PRE key, and whoever could swap that key would get share i re-encrypted to them.

The file is public (mode 0644: anyone may read it, e.g. to compare fingerprints); the
operator refuses one that group or others could change (:func:`read_public_file`), a
symlink, or any signature that does not verify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ciphertwin.agents.identity import PublicIdentity
from ciphertwin.config.files import read_public_file, write_private_file
from ciphertwin.crypto import wire
from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.kpcpre import PrePublicKey
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.errors import CipherTwinError, ValidationError
from ciphertwin.mpc_nodes.roster import NodeIdentity, RosterEntry

ENTRY_FILE_TAG = "node-entry-file"
_SIGN_CONTEXT = "node-entry-file/pre"
ENTRY_FILE_MODE = 0o644
MAX_ENTRY_FILE_BYTES = 8192


@dataclass(frozen=True)
class NodeEntry:
    entry: RosterEntry
    pre: PrePublicKey

    @property
    def fingerprint(self) -> str:
        """The node's public-key fingerprint, as ``node init`` printed it: the operator
        compares the two out of band before publishing."""
        return PublicIdentity(self.entry.node_id, "node", self.pre, VerifyKey(self.entry.sign_public),
                              self.entry.kx_public).fingerprint


def write_entry_file(path: str | os.PathLike[str], node: NodeIdentity, pre: PrePublicKey) -> NodeEntry:
    entry, pre_bytes = node.entry(), pre.to_bytes()
    sig = node.signing.sign_object(_SIGN_CONTEXT, {"entry": entry.to_bytes(), "pre": pre_bytes})
    write_private_file(path, wire.encode(ENTRY_FILE_TAG, {
        "entry": entry.to_bytes(), "pre": pre_bytes, "sig": sig}), mode=ENTRY_FILE_MODE)
    return NodeEntry(entry, pre)


def read_entry_file(path: str | os.PathLike[str]) -> NodeEntry:
    """The checked entry: file not changeable by others, entry self-signed, PRE key signed."""
    data = read_public_file(path, MAX_ENTRY_FILE_BYTES)
    try:
        f = wire.decode(data, ENTRY_FILE_TAG, ("entry", "pre", "sig"), max_bytes=MAX_ENTRY_FILE_BYTES)
        entry_bytes = f.bytes("entry", max_len=1024)
        pre_bytes = f.bytes("pre", max_len=1024)
        entry = RosterEntry.from_bytes(entry_bytes)
        VerifyKey(entry.sign_public).verify_object(
            _SIGN_CONTEXT, {"entry": entry_bytes, "pre": pre_bytes}, f.bytes("sig", 64))
        return NodeEntry(entry, PrePublicKey.from_bytes(pre_bytes))
    except SignatureInvalid:
        raise ValidationError(f"{path}: the node's signature over its PRE key does not "
                              "verify (file altered?)") from None
    except CipherTwinError as exc:
        raise ValidationError(f"{path}: not a valid node entry file ({exc})") from None
