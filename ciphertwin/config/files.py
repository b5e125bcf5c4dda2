"""Private files: written atomically with an exact mode, read refusing anything others could
read or change (key files, bundles, roster and share-index state).

Kept below ``agents`` and ``protocol`` because both keep state this way.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ciphertwin.errors import ValidationError

MAX_FILE_BYTES = 1024 * 1024


def write_private_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> Path:
    """Atomically replace ``path`` with ``data``; the file has ``mode`` from its first byte."""
    path = Path(path)
    if not isinstance(data, (bytes, bytearray)):
        raise ValidationError(f"file content must be bytes, got {type(data).__name__}")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        with os.fdopen(fd, "wb", closefd=True) as fh:
            fh.write(bytes(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_private_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES,
                      require_private: bool = True) -> bytes:
    """Read a regular file (no symlink), refusing one that group/others could read or write."""
    return _read_regular(path, max_bytes, 0o077 if require_private else 0, "read or change")


def read_public_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a regular file (no symlink) anyone may read, refusing one group/others could change
    (public keys and node entries: readable by all, replaceable only by their owner)."""
    return _read_regular(path, max_bytes, 0o022, "change")


def _read_regular(path: str | os.PathLike[str], max_bytes: int, forbidden: int,
                  what: str) -> bytes:
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted in place of a key file must not hang us
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValidationError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(f"{path}: not a regular file")
        if st.st_mode & forbidden:
            raise ValidationError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, which lets other users {what} "
                f"it; run: chmod {0o666 & ~forbidden & 0o666:o} {path}"
            )
        if st.st_size > max_bytes:
            raise ValidationError(f"{path}: {st.st_size} bytes, limit is {max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValidationError(f"{path}: larger than {max_bytes} bytes")
    return data
