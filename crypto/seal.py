"""Microsoft SEAL (through ``tenseal.sealapi``): parameters, contexts and serialization.

Every CKKS operation that touches a secret key or draws randomness -- key generation,
encryption, decryption, encryptions of zero for re-randomisation -- runs in SEAL; this
module gives the engine what it needs around that:

* the parameter presets (:func:`preset`), each a SEAL ``EncryptionParameters`` that
  SEAL itself accepts at the claimed HE-standard level (:func:`context_for`);
* byte I/O: ``sealapi`` saves and loads only through file paths, so objects go through a
  per-thread anonymous in-memory file (``memfd``, never on a file system; Linux);
* SEAL's own serialization, parsed and written here for the cloud's fast path (a
  header: magic ``0xA15E``, header size 16, version, compression, reserved, total size;
  then the object's members, zstd-compressed). docs/seal-interop.md specifies the bytes.

Untrusted bytes are checked here (header, sizes, parms_id, ranges) before SEAL sees them.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as sealapi
from backports import zstd

from cipherface.errors import DecodeError, InsecureParametersError, InvalidArgumentError

U64 = npt.NDArray[np.uint64]

MAGIC = 0xA15E
HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, 0, size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
#: Largest total coefficient-modulus bits for a ternary secret, by the HE standard, as
#: SEAL's ``CoeffModulus::MaxBitCount`` (tests compare the two).
HE_STANDARD_MAX_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
_SEC = {128: "TC128", 192: "TC192", 256: "TC256"}
PRIME_BITS = (30, 30, 30)  # two data primes q0, q1 and SEAL's special prime


# ------------------------------------------------------------------ parameters
@dataclass(frozen=True, kw_only=True)
class Params:
    """One parameter set.

    Args:
        n: ring degree ``N``; also the number of templates per gallery block.
        primes: SEAL's coefficient modulus ``(q0, q1, special)``; ciphertexts live at
            ``(q0, q1)`` and results at ``q0`` after rescaling by ``q1``.
        delta_bits: fixed-point scale ``2**delta_bits`` of every encoded value.
        security: claimed security level in bits (128, 192 or 256).
    """

    n: int
    primes: tuple[int, int, int]
    delta_bits: int = 29
    security: int = 128

    @property
    def data_primes(self) -> tuple[int, int]:
        return (self.primes[0], self.primes[1])

    @property
    def delta(self) -> float:
        return float(2**self.delta_bits)

    @property
    def result_scale(self) -> float:
        """Scale of a rescaled product, computed as SEAL does (double arithmetic)."""
        return self.delta * self.delta / float(self.primes[1])

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "primes": list(self.primes),
            "delta_bits": self.delta_bits,
            "security": self.security,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Params:
        """Parse parameters from a key file; only the engine's presets are accepted.

        Raises:
            InvalidArgumentError: malformed. InsecureParametersError: not a preset.
        """
        try:
            security = int(d["security"])
            got = (int(d["n"]), tuple(int(p) for p in d["primes"]), int(d["delta_bits"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed CKKS parameters: {exc}") from exc
        if security not in _SEC:
            raise InsecureParametersError(f"unknown security level {security}")
        ref = preset(security)
        if got != (ref.n, ref.primes, ref.delta_bits):
            raise InsecureParametersError(
                f"parameters are not the {security}-bit preset (n={ref.n}, primes={ref.primes})"
            )
        return ref


def check_security(p: Params) -> None:
    """Refuse parameters above the HE-standard bound of their claimed level.

    Raises:
        InsecureParametersError: ``log2 q`` too large for ``N`` at ``p.security``.
    """
    table = HE_STANDARD_MAX_BITS.get(p.security)
    if table is None or p.n not in table:
        raise InsecureParametersError(
            f"no HE-standard bound for N={p.n} at {p.security}-bit security"
        )
    total_bits = sum(int(q).bit_length() for q in p.primes)
    if total_bits > table[p.n]:
        raise InsecureParametersError(
            f"N={p.n} with a {total_bits}-bit modulus is below {p.security}-bit security "
            f"(the HE standard allows at most {table[p.n]} bits)"
        )


@cache
def preset(security: int = 128) -> Params:
    """The engine's parameter set for a security level (128, 192 or 256 bits).

    128: N=4096, 90 bits (bound 109). 192 and 256: N=8192, 90 bits (bounds 152 / 118);
    N=4096 would allow only 75 / 58 bits, too few for two 30-bit data primes plus the
    special prime SEAL needs.

    Raises:
        InvalidArgumentError: another level.
    """
    if security not in _SEC:
        raise InvalidArgumentError(f"security_level must be 128, 192 or 256, not {security}")
    n = 4096 if security == 128 else 8192
    primes = tuple(m.value() for m in sealapi.CoeffModulus.Create(n, list(PRIME_BITS)))
    p = Params(n=n, primes=(primes[0], primes[1], primes[2]), security=security)
    check_security(p)
    return p


def encryption_parameters(p: Params) -> Any:
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(p.n)
    parms.set_coeff_modulus([sealapi.Modulus(q) for q in p.primes])
    return parms


@cache
def context_for(p: Params) -> Any:
    """SEAL's context for ``p``, validated by SEAL at ``p.security`` bits.

    Raises:
        InsecureParametersError: SEAL refuses the parameters at that level.
    """
    check_security(p)
    sec = getattr(sealapi.SEC_LEVEL_TYPE, _SEC[p.security])
    ctx = sealapi.SEALContext(encryption_parameters(p), True, sec)
    if not ctx.parameters_set():
        raise InsecureParametersError(
            f"SEAL refuses the parameters: {ctx.parameters_error_message()}"
        )
    return ctx


@cache
def parms_ids(p: Params) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """SEAL's parms_id of the key level (3 primes), data level (q0, q1) and result level (q0)."""
    ctx = context_for(p)
    first = ctx.first_context_data()
    return (
        tuple(ctx.key_parms_id()),
        tuple(ctx.first_parms_id()),
        tuple(first.next_context_data().parms_id()),
    )


# ------------------------------------------------------------------- byte I/O
class _MemFile(threading.local):
    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("cipherface-seal", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
        else:  # pragma: no cover - non-Linux: a private 0600 file, emptied after each use
            d = tempfile.mkdtemp(prefix="cipherface-seal-")
            self.path = os.path.join(d, "obj")
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)


_MEM = _MemFile()


def save_bytes(obj: Any) -> bytes:
    """``obj.save`` (SEAL object or Serializable) into bytes, through the in-memory file."""
    m = _MEM
    try:
        obj.save(m.path)
        data = os.pread(m.fd, os.fstat(m.fd).st_size, 0)
    finally:
        os.ftruncate(m.fd, 0)  # secret keys and plaintexts do not linger
    return data


def load_into(obj: Any, data: bytes, ctx: Any | None = None) -> Any:
    """``obj.load(ctx, bytes)`` through the in-memory file; SEAL validates what it loads.

    Raises:
        DecodeError: SEAL refuses the bytes.
    """
    m = _MEM
    try:
        os.pwrite(m.fd, data, 0)
        if ctx is None:
            obj.load(m.path)
        else:
            obj.load(ctx, m.path)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DecodeError(f"SEAL refused the object: {exc}") from exc
    finally:
        os.ftruncate(m.fd, 0)
    return obj


# ------------------------------------------------------------ serialization
def header(size: int, compr: int) -> bytes:
    return HEADER.pack(MAGIC, 16, 4, SEAL_VERSION[1], compr, 0, size)


def _seal_version() -> tuple[int, int]:
    # What this SEAL build writes into headers (tenseal 0.3.18 bundles SEAL 4.x).
    p = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    data = save_bytes(p)
    _, _, major, minor, _, _, _ = HEADER.unpack_from(data)
    return int(major), int(minor)


SEAL_VERSION = _seal_version()


def unwrap(data: bytes, what: str, max_members: int) -> bytes:
    """Check a SEAL header and return the (decompressed) members.

    Raises:
        DecodeError: bad header, size, compression mode, or more than ``max_members`` bytes.
    """
    if not isinstance(data, bytes) or len(data) < HEADER.size:
        raise DecodeError(f"{what}: not a SEAL object")
    magic, hsize, major, _minor, compr, _res, size = HEADER.unpack_from(data)
    if magic != MAGIC or hsize != 16 or major != 4 or size != len(data):
        raise DecodeError(f"{what}: not a SEAL 4.x object (bad header)")
    body = data[16:]
    if compr == COMPR_ZSTD:
        try:
            d = zstd.ZstdDecompressor()
            out = d.decompress(body, max_length=max_members + 1)
        except zstd.ZstdError as exc:
            raise DecodeError(f"{what}: corrupt zstd data ({exc})") from exc
        if len(out) > max_members or not d.eof:
            raise DecodeError(f"{what}: larger than expected")
        return out
    if compr == COMPR_NONE:
        if len(body) > max_members:
            raise DecodeError(f"{what}: larger than expected")
        return body
    raise DecodeError(f"{what}: unsupported SEAL compression mode {compr}")


def wrap(members: bytes, *, compress: bool = True) -> bytes:
    """Members -> a SEAL object (zstd level 1 when ``compress``)."""
    if compress:
        members = zstd.compress(members, level=1)
        return header(16 + len(members), COMPR_ZSTD) + members
    return header(16 + len(members), COMPR_NONE) + members


_CT = struct.Struct("<4QBQQQdQ")  # parms_id, ntt, size, N, k, scale, correction factor
_DYN = struct.Struct("<Q")


@dataclass(frozen=True, kw_only=True)
class CipherData:
    """A parsed (unseeded) SEAL ciphertext: ``data`` is ``(size, k, N)`` uint64."""

    parms_id: tuple[int, ...]
    scale: float
    data: U64


def parse_ciphertext(
    data: bytes, *, what: str, parms_id: tuple[int, ...], size: int, n: int, q: U64
) -> CipherData:
    """Parse an unseeded SEAL ciphertext and check it is exactly what is expected.

    Raises:
        DecodeError: wrong level, size, ring, NTT flag, array length or residues >= q.
    """
    k = len(q)
    want = size * k * n
    body = unwrap(data, what, _CT.size + 16 + 8 + 8 * want)
    if len(body) != _CT.size + 16 + 8 + 8 * want:
        raise DecodeError(f"{what}: {len(body)} member bytes, expected a size-{size} ciphertext")
    f = _CT.unpack_from(body)
    if tuple(f[:4]) != parms_id:
        raise DecodeError(f"{what}: ciphertext at another level or for other parameters")
    if (f[4], f[5], f[6], f[7]) != (1, size, n, k) or f[9] != 1:
        raise DecodeError(f"{what}: not a size-{size} NTT-form ciphertext of this ring")
    dyn = body[_CT.size :]
    _, _, major, _, compr, _, dsize = HEADER.unpack_from(dyn)
    if major != 4 or compr != COMPR_NONE or dsize != 16 + 8 + 8 * want:
        raise DecodeError(f"{what}: bad coefficient array header")
    if _DYN.unpack_from(dyn, 16)[0] != want:
        raise DecodeError(f"{what}: bad coefficient count")
    arr = np.frombuffer(dyn, dtype="<u8", count=want, offset=24).reshape(size, k, n)
    if np.any(arr >= q[None, :, None]):
        raise DecodeError(f"{what}: residue out of range")
    return CipherData(parms_id=parms_id, scale=float(f[8]), data=arr.astype(np.uint64))


def ciphertext_bytes(
    arr: U64, *, parms_id: tuple[int, ...], scale: float, compress: bool = True
) -> bytes:
    """Write ``(size, k, N)`` NTT-form residues as a SEAL ciphertext (loadable by SEAL)."""
    size, k, n = arr.shape
    raw = np.ascontiguousarray(arr, dtype="<u8").tobytes()
    dyn = header(16 + 8 + len(raw), COMPR_NONE) + _DYN.pack(size * k * n) + raw
    return wrap(_CT.pack(*parms_id, 1, size, n, k, scale, 1) + dyn, compress=compress)


_PT = struct.Struct("<4QQd")  # parms_id, coeff count, scale


def plaintext_bytes(arr: U64, *, parms_id: tuple[int, ...], scale: float) -> bytes:
    """Write ``(k, N)`` NTT-form residues as a SEAL CKKS plaintext (uncompressed)."""
    raw = np.ascontiguousarray(arr, dtype="<u8").tobytes()
    count = arr.size
    dyn = header(16 + 8 + len(raw), COMPR_NONE) + _DYN.pack(count) + raw
    return wrap(_PT.pack(*parms_id, count, scale) + dyn, compress=False)


def parse_plaintext(data: bytes, *, k: int, n: int) -> U64:
    """Read a plaintext SEAL saved (our own process's output): ``(k, N)`` residues."""
    body = unwrap(data, "plaintext", _PT.size + 24 + 8 * k * n)
    count = _PT.unpack_from(body)[4]
    if count != k * n:
        raise DecodeError(f"plaintext has {count} coefficients, expected {k * n}")
    return np.frombuffer(body, dtype="<u8", count=count, offset=_PT.size + 24).reshape(k, n)


def check_seeded(data: object, what: str, *, parms_id: tuple[int, ...], n: int, k: int) -> bytes:
    """Cheap checks of an edge's seeded ciphertext before SEAL expands it.

    Returns:
        The same object, uncompressed (SEAL loads it without inflating it again).

    Raises:
        DecodeError: not bytes, bad header, another level, size or ring.
    """
    if not isinstance(data, bytes):
        raise DecodeError(f"{what}: expected bytes")
    # Seeded (c0 and the seed record) or full (c0 and c1, public-key encryptions).
    body = unwrap(data, what, _CT.size + 24 + 16 * k * n)
    if len(body) < _CT.size:
        raise DecodeError(f"{what}: truncated ciphertext")
    f = _CT.unpack_from(body)
    if tuple(f[:4]) != parms_id or (f[4], f[5], f[6], f[7]) != (1, 2, n, k):
        raise DecodeError(f"{what}: not a fresh ciphertext of this key's parameters")
    # Hand SEAL the members already inflated (and bounded) here: it need not inflate again.
    return wrap(body, compress=False)
