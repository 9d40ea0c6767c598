"""SHA-256 whose running state can be saved and restored: a blob's hash survives a restart.

hashlib's objects cannot be pickled or exported, so a blob hashed in order as its pieces
arrive would have to be hashed again from its first byte after an agent restart. OpenSSL's
``SHA256_CTX`` is a plain struct (eight state words, the bit count, one 64-byte block and its
fill): copying its bytes is saving the hash. This goes to the same libcrypto that hashlib
uses, through ctypes (which releases the GIL during the call, so hashing runs beside the
event loop), at the same speed (about 1 GB/s a core with SHA-NI on these machines).

Where libcrypto cannot be loaded, :func:`available` is False and callers hash again from the
start after a restart (hashlib); nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib

__all__ = ["STATE_SIZE", "ResumableSha256", "available"]

# sizeof(SHA256_CTX) is 112 bytes in every OpenSSL since 0.9.8; the buffer is larger so that a
# bigger struct could not write past it, and all of it is saved.
STATE_SIZE = 256


@functools.cache
def _libcrypto() -> ctypes.CDLL | None:
    for name in ("libcrypto.so.3", None):
        if name is None:  # find_library runs ldconfig: only when the usual name failed
            name = ctypes.util.find_library("crypto")
            if name is None:
                break
        try:
            lib = ctypes.CDLL(name)
            init, update, final = lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final
        except (OSError, AttributeError):
            continue
        init.argtypes = [ctypes.c_char_p]
        update.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        final.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        if _self_test(lib):
            return lib
    return None


def _self_test(lib: ctypes.CDLL) -> bool:
    """The library's answer, saved and restored halfway, equals hashlib's."""
    data = bytes(range(256)) * 5
    ctx = ctypes.create_string_buffer(STATE_SIZE)
    if lib.SHA256_Init(ctx) != 1 or lib.SHA256_Update(ctx, data[:700], 700) != 1:
        return False
    copy = ctypes.create_string_buffer(ctx.raw, STATE_SIZE)
    out = ctypes.create_string_buffer(32)
    lib.SHA256_Update(copy, data[700:], len(data) - 700)
    lib.SHA256_Final(out, copy)
    return out.raw == hashlib.sha256(data).digest()


def available() -> bool:
    """Whether hashes can be saved (libcrypto found and answering right)."""
    return _libcrypto() is not None


class ResumableSha256:
    """SHA-256 with ``state()`` to save it and ``ResumableSha256(state)`` to go on from there.

    Without libcrypto it is hashlib's, and ``state()`` raises RuntimeError."""

    def __init__(self, state: bytes | None = None) -> None:
        self._lib = _libcrypto()
        self._hashlib = hashlib.sha256() if self._lib is None else None
        if self._lib is None:
            if state is not None:
                raise RuntimeError("no libcrypto: a saved SHA-256 state cannot be restored")
            return
        if state is None:
            self._ctx = ctypes.create_string_buffer(STATE_SIZE)
            self._lib.SHA256_Init(self._ctx)
        else:
            if len(state) != STATE_SIZE:
                raise ValueError(f"a SHA-256 state is {STATE_SIZE} bytes, not {len(state)}")
            self._ctx = ctypes.create_string_buffer(state, STATE_SIZE)

    def update(self, data: bytes) -> None:
        if self._hashlib is not None:
            self._hashlib.update(data)
        else:
            assert self._lib is not None
            self._lib.SHA256_Update(self._ctx, data, len(data))

    def state(self) -> bytes:
        if self._lib is None:
            raise RuntimeError("no libcrypto: this SHA-256 state cannot be saved")
        return bytes(self._ctx.raw)

    def hexdigest(self) -> str:
        """The digest of everything so far (the hash itself can go on)."""
        if self._hashlib is not None:
            return self._hashlib.hexdigest()
        assert self._lib is not None
        copy = ctypes.create_string_buffer(self._ctx.raw, STATE_SIZE)
        out = ctypes.create_string_buffer(32)
        self._lib.SHA256_Final(out, copy)
        return out.raw.hex()
