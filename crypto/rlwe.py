"""Ring-LWE arithmetic for the CKKS engine: RNS polynomials mod ``X^N + 1`` on numpy + numba.

This is the approximate-number ("CKKS") ring arithmetic that SEAL implements, cut
down to what encrypted face matching needs and exposed at the level the gallery
engine needs: raw residue arrays it can multiply-accumulate over a whole gallery
block in one tight loop, without rotations, relinearisation or key switching.

* Messages are *coefficient-encoded*: a fixed-point value ``round(x * 2^29)`` sits
  in one polynomial coefficient. Multiplying a polynomial by a constant polynomial
  scales every coefficient, so a block of ``N`` templates is scored against a probe
  with ``d`` ciphertext products and no rotation (see docs/crypto.md).
* Parameters: ``N`` = 4096 (8192 for 256-bit), two ~30-bit NTT primes, ternary
  secret, centred-binomial error of standard deviation 3.24 (eta = 21). ``log2 q`` = 60
  is below the HE-standard bound for the claimed level (:data:`HE_STANDARD_MAX_BITS`),
  which :func:`check_security` asserts and tests check against SEAL's own table.
* Randomness comes from the OS CSPRNG (``secrets``); public uniform polynomials are
  expanded from a 32-byte ``secrets`` seed with SHAKE-256, which halves ciphertexts
  (only ``c0`` and the seed travel), as SEAL's seeded serialisation does.

Arrays: a polynomial in RNS form is ``uint64[k, N]`` (``k`` primes), values in
``[0, q_i)``. "NTT domain" arrays are in this module's own (bit-reversed) order;
nothing outside this module depends on that order.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from functools import cache

import gmpy2
import numba
import numpy as np
import numpy.typing as npt

from cipherface.errors import InsecureParametersError, InvalidArgumentError

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: Largest total coefficient-modulus bits for a ternary secret, by the HE standard
#: (homomorphicencryption.org, 2018), as SEAL's ``CoeffModulus::MaxBitCount``.
HE_STANDARD_MAX_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}

SEED_BYTES = 32
MAX_BLOCKS = 1 << 13  # 2^13 blocks of N=4096 = 33 M templates per gallery result

#: numba's fallback "workqueue" threading layer aborts the process when two threads run
#: parallel kernels at once; every parallel kernel call takes this lock (each call
#: already uses every core, so nothing is lost).
PARALLEL_LOCK = threading.Lock()
CBD_ETA = 21  # centred binomial, variance eta/2 = 10.5 (sigma 3.24, as SEAL's 3.2)


# ----------------------------------------------------------------- parameters
def _ntt_primes(n: int, bits: int, count: int) -> tuple[int, ...]:
    """The ``count`` largest primes below ``2**bits`` with ``q = 1 mod 2n`` (NTT-friendly)."""
    out: list[int] = []
    q = ((1 << bits) - 1) // (2 * n) * (2 * n) + 1
    while len(out) < count:
        if q < (1 << (bits - 1)):
            raise InvalidArgumentError(f"not enough {bits}-bit NTT primes for N={n}")
        if gmpy2.is_prime(q, 50):
            out.append(q)
        q -= 2 * n
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Params:
    """One parameter set.

    Args:
        n: ring degree ``N`` (power of two); also the number of templates per block.
        primes: RNS primes, each ``< 2**30`` and ``= 1 mod 2N``.
        delta_bits: fixed-point scale ``2**delta_bits`` of every encoded value.
        security: claimed security level in bits (128, 192 or 256).
    """

    n: int
    primes: tuple[int, ...]
    delta_bits: int = 29
    security: int = 128
    name: str = field(default="")

    @property
    def log_q(self) -> float:
        return sum(float(np.log2(p)) for p in self.primes)

    @property
    def delta(self) -> float:
        return float(2**self.delta_bits)

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "primes": list(self.primes),
            "delta_bits": self.delta_bits,
            "security": self.security,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Params:
        """Parse parameters from a key file; only the engine's presets are accepted.

        Raises:
            InvalidArgumentError: malformed. InsecureParametersError: not a preset.
        """
        try:
            n = int(d["n"])  # type: ignore[call-overload]
            primes = tuple(int(p) for p in d["primes"])  # type: ignore[attr-defined]
            delta_bits = int(d["delta_bits"])  # type: ignore[call-overload]
            security = int(d["security"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed CKKS parameters: {exc}") from exc
        p = cls(n=n, primes=primes, delta_bits=delta_bits, security=security)
        check_security(p)
        ref = preset(security)
        if (p.n, p.primes, p.delta_bits) != (ref.n, ref.primes, ref.delta_bits):
            # Anything else (duplicate primes, another scale) is at best untested.
            raise InsecureParametersError(
                f"parameters are not the {security}-bit preset (n={ref.n}, primes={ref.primes})"
            )
        return ref


def check_security(p: Params) -> None:
    """Refuse parameters below their claimed security level (HE standard bounds).

    Raises:
        InsecureParametersError: ``log2 q`` too large for ``N`` at ``p.security``,
            or malformed primes.
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
    for q in p.primes:
        if not (q < (1 << 30) and (q - 1) % (2 * p.n) == 0 and gmpy2.is_prime(q, 50)):
            raise InsecureParametersError(f"{q} is not a 30-bit NTT prime for N={p.n}")
    if len(set(p.primes)) != 2 or 2 * p.delta_bits + 2 > total_bits:
        raise InsecureParametersError("the engine needs two primes and room for scale^2")


@cache
def preset(security: int = 128) -> Params:
    """The engine's parameter set for a security level (128, 192 or 256 bits).

    128 and 192 share N=4096 / 60-bit q (60 <= 75, the 192-bit bound); 256 needs
    N=8192 (60 > 58, the 256-bit bound at N=4096).

    Raises:
        InvalidArgumentError: another level.
    """
    if security not in (128, 192, 256):
        raise InvalidArgumentError(f"security_level must be 128, 192 or 256, not {security}")
    n = 8192 if security == 256 else 4096
    p = Params(n=n, primes=_ntt_primes(n, 30, 2), security=security, name=f"cf-rlwe-{security}")
    check_security(p)
    return p


# -------------------------------------------------------------------------- NTT
@numba.njit(cache=True, nogil=True)
def _ntt_inplace(a: U64, q: np.uint64, psi_rev: U64) -> None:  # pragma: no cover - jit
    n = a.shape[0]
    t = n
    m = 1
    while m < n:
        t //= 2
        for i in range(m):
            j1 = 2 * i * t
            s = psi_rev[m + i]
            for j in range(j1, j1 + t):
                u = a[j]
                v = (a[j + t] * s) % q
                a[j] = (u + v) % q
                a[j + t] = (u + q - v) % q
        m *= 2


@numba.njit(cache=True, nogil=True)
def _intt_inplace(
    a: U64, q: np.uint64, psi_inv_rev: U64, n_inv: np.uint64
) -> None:  # pragma: no cover - jit
    n = a.shape[0]
    t = 1
    m = n
    while m > 1:
        j1 = 0
        h = m // 2
        for i in range(h):
            s = psi_inv_rev[h + i]
            for j in range(j1, j1 + t):
                u = a[j]
                v = a[j + t]
                a[j] = (u + v) % q
                a[j + t] = ((u + q - v) * s) % q
            j1 += 2 * t
        t *= 2
        m //= 2
    for j in range(n):
        a[j] = (a[j] * n_inv) % q


@numba.njit(cache=True, parallel=True)
def _ntt_rows(rows: U64, prime_idx: npt.NDArray[np.int64], qs: U64, tables: U64) -> None:
    for r in numba.prange(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _ntt_inplace(rows[r], qs[k], tables[k])


@numba.njit(cache=True, parallel=True)
def _intt_rows(
    rows: U64, prime_idx: npt.NDArray[np.int64], qs: U64, tables: U64, n_invs: U64
) -> None:
    for r in numba.prange(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _intt_inplace(rows[r], qs[k], tables[k], n_invs[k])


def _bitrev(n: int) -> npt.NDArray[np.int64]:
    bits = n.bit_length() - 1
    idx = np.arange(n)
    rev = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    return rev


class Ring:
    """NTT tables and polynomial operations for one :class:`Params`."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.n = n = params.n
        self.k = len(params.primes)
        self.q = np.array(params.primes, dtype=np.uint64)
        self.qcol = self.q[:, None]
        rev = _bitrev(n)
        fwd, inv, ninv = [], [], []
        for q in params.primes:
            psi = self._primitive_root(q, 2 * n)
            pows = np.array([pow(psi, int(e), q) for e in range(n)], dtype=np.uint64)
            ipows = np.array([pow(psi, -int(e), q) for e in range(n)], dtype=np.uint64)
            fwd.append(pows[rev])
            inv.append(ipows[rev])
            ninv.append(pow(n, -1, q))
        self._fwd = np.ascontiguousarray(np.stack(fwd))
        self._inv = np.ascontiguousarray(np.stack(inv))
        self._ninv = np.array(ninv, dtype=np.uint64)

    @staticmethod
    def _primitive_root(q: int, order: int) -> int:
        for x in range(2, q):
            psi = pow(x, (q - 1) // order, q)
            if pow(psi, order // 2, q) == q - 1:
                return psi
        raise InvalidArgumentError(f"no primitive {order}-th root mod {q}")  # pragma: no cover

    def _rows(self, a: U64, primes: int) -> tuple[U64, npt.NDArray[np.int64]]:
        rows = a.reshape(-1, self.n)
        idx = np.tile(np.arange(primes, dtype=np.int64), rows.shape[0] // primes)
        return rows, idx

    def ntt(self, a: U64) -> U64:
        """Forward NTT of an array ``(..., k', N)`` (``k' <= k`` leading primes); returns a copy."""
        out = np.ascontiguousarray(a, dtype=np.uint64).copy()
        rows, idx = self._rows(out, out.shape[-2])
        with PARALLEL_LOCK:
            _ntt_rows(rows, idx, self.q, self._fwd)
        return out

    def intt(self, a: U64) -> U64:
        """Inverse of :meth:`ntt`; returns a copy."""
        out = np.ascontiguousarray(a, dtype=np.uint64).copy()
        rows, idx = self._rows(out, out.shape[-2])
        with PARALLEL_LOCK:
            _intt_rows(rows, idx, self.q, self._inv, self._ninv)
        return out

    # ------------------------------------------------------------- conversions
    def to_rns(self, x: I64, primes: int | None = None) -> U64:
        """Signed integers ``(..., N)`` -> residues ``(..., k, N)``."""
        k = self.k if primes is None else primes
        x = np.asarray(x, dtype=np.int64)
        return np.stack([np.mod(x, int(q)).astype(np.uint64) for q in self.params.primes[:k]], -2)

    def from_rns(self, r: U64) -> I64:
        """Residues ``(..., k, N)`` (k = 1 or 2) -> centred signed integers ``(..., N)``."""
        q0 = int(self.q[0])
        if r.shape[-2] == 1:
            x = r[..., 0, :].astype(np.int64)
            return np.where(x > q0 // 2, x - q0, x)
        q1 = int(self.q[1])
        x0 = r[..., 0, :].astype(np.uint64)
        x1 = r[..., 1, :].astype(np.uint64)
        inv = np.uint64(pow(q0, -1, q1))
        t = (((x1 + np.uint64(q1) - x0 % np.uint64(q1)) % np.uint64(q1)) * inv) % np.uint64(q1)
        full = x0 + np.uint64(q0) * t  # < q0*q1 < 2^60
        qq = q0 * q1
        signed = full.astype(np.int64)
        return np.where(full > np.uint64(qq // 2), signed - np.int64(qq), signed)

    def rescale(self, c: U64) -> U64:
        """Divide coefficient residues ``(..., 2, N)`` by ``q1`` (rounded) -> ``(..., 1, N)``."""
        q0, q1 = int(self.q[0]), int(self.q[1])
        x1 = c[..., 1, :].astype(np.int64)
        x1 = np.where(x1 > q1 // 2, x1 - q1, x1)  # centred residue: round, not floor
        diff = np.mod(c[..., 0, :].astype(np.int64) - x1, q0).astype(np.uint64)
        out = (diff * np.uint64(pow(q1, -1, q0))) % np.uint64(q0)
        return out[..., None, :]

    def mul(self, a: U64, b: U64, primes: int | None = None) -> U64:
        """Elementwise product mod q of NTT-domain arrays (residues < 2^30, so no overflow)."""
        k = a.shape[-2] if primes is None else primes
        return (a * b) % self.qcol[:k]

    def add(self, a: U64, b: U64) -> U64:
        k = a.shape[-2]
        return (a + b) % self.qcol[:k]

    def monomial_ntt(self, power: int) -> U64:
        """NTT of ``X^power`` (negacyclic: ``X^N = -1``), shape ``(k, N)``."""
        e = np.zeros(self.n, dtype=np.int64)
        p = power % (2 * self.n)
        if p < self.n:
            e[p] = 1
        else:
            e[p - self.n] = -1
        return self.ntt(self.to_rns(e))

    # ---------------------------------------------------------------- sampling
    def uniform(self, shape: tuple[int, ...], *, seed: bytes | None = None) -> U64:
        """Uniform residues of shape ``shape + (k, N)``; from ``seed`` with SHAKE-256 if given."""
        count = int(np.prod(shape, dtype=np.int64)) * self.k
        out = np.empty((count, self.n), dtype=np.uint64)
        xof = hashlib.shake_256(seed) if seed is not None else None
        need = count * self.n
        # Rejection sampling of 30-bit words: the primes are > 2^30 - 2^17, so < 0.02 % rejected.
        nbytes = (need + need // 64 + 64) * 4
        raw = xof.digest(nbytes) if xof is not None else secrets.token_bytes(nbytes)
        words = np.frombuffer(raw, dtype="<u4").astype(np.uint64) & np.uint64((1 << 30) - 1)
        pos = 0
        for row in range(count):
            q = self.q[row % self.k]
            chunk = words[pos : pos + self.n + self.n // 32 + 32]
            ok = chunk[chunk < q]
            if ok.shape[0] < self.n:  # astronomically unlikely; keep it deterministic anyway
                raise InvalidArgumentError("uniform sampler ran out of words")  # pragma: no cover
            out[row] = ok[: self.n]
            pos += int(np.searchsorted(np.cumsum(chunk < q), self.n) + 1)
        return out.reshape((*shape, self.k, self.n))

    def ternary(self, count: int = 1) -> I64:
        """``count`` uniform ternary polynomials (values -1, 0, 1) from the OS CSPRNG."""
        need = count * self.n
        vals: list[npt.NDArray[np.uint8]] = []
        got = 0
        while got < need:
            b = np.frombuffer(secrets.token_bytes(need - got + 64), dtype=np.uint8)
            b = b[b < 255]  # 255 = 3 * 85: reject to stay unbiased
            vals.append(b)
            got += b.shape[0]
        x = np.concatenate(vals)[:need].astype(np.int64) % 3 - 1
        return x.reshape(count, self.n)

    def error(self, count: int = 1) -> I64:
        """``count`` centred-binomial error polynomials (eta = 21) from the OS CSPRNG."""
        need = count * self.n
        raw = np.frombuffer(secrets.token_bytes(need * 8), dtype="<u4").reshape(need, 2)
        mask = np.uint32((1 << CBD_ETA) - 1)
        a = np.bitwise_count(raw[:, 0] & mask).astype(np.int64)
        b = np.bitwise_count(raw[:, 1] & mask).astype(np.int64)
        return (a - b).reshape(count, self.n)


@cache
def ring_for(params: Params) -> Ring:
    """Ring tables are deterministic in the parameters: build once per process."""
    return Ring(params)


# ------------------------------------------------------------------------ keys
@dataclass(frozen=True, kw_only=True, eq=False)
class SecretKey:
    """Ternary secret ``s``; holds ``s`` and ``s^2`` in the NTT domain for size-3 decryption."""

    params: Params
    s: I64  # (N,) coefficients in {-1, 0, 1}
    s_ntt: U64
    s2_ntt: U64

    @classmethod
    def generate(cls, params: Params) -> SecretKey:
        return cls.from_coeffs(params, ring_for(params).ternary(1)[0])

    @classmethod
    def from_coeffs(cls, params: Params, s: I64) -> SecretKey:
        r = ring_for(params)
        s = np.asarray(s, dtype=np.int64)
        if s.shape != (params.n,) or not np.all(np.abs(s) <= 1):
            raise InvalidArgumentError("secret key must be N ternary coefficients")
        s_ntt = r.ntt(r.to_rns(s))
        return cls(params=params, s=s, s_ntt=s_ntt, s2_ntt=r.mul(s_ntt, s_ntt))


@dataclass(frozen=True, kw_only=True, eq=False)
class PublicKey:
    """``(b, a)`` with ``b = -a*s + e``; ``a`` is expanded from ``seed``."""

    params: Params
    b: U64  # (k, N) NTT domain
    seed: bytes

    @property
    def a(self) -> U64:
        return ring_for(self.params).uniform((), seed=self.seed)

    @classmethod
    def generate(cls, sk: SecretKey) -> PublicKey:
        r = ring_for(sk.params)
        seed = secrets.token_bytes(SEED_BYTES)
        a = r.uniform((), seed=seed)
        e = r.ntt(r.to_rns(r.error(1)[0]))
        b = (r.qcol - r.mul(a, sk.s_ntt) + e) % r.qcol
        return cls(params=sk.params, b=b, seed=seed)


# ------------------------------------------------------------------ encryption
def encrypt_symmetric(sk: SecretKey, m_ntt: U64) -> tuple[U64, bytes]:
    """Encrypt NTT-domain messages ``(count, k, N)`` with the secret key.

    Returns:
        ``(c0, seed)``: ``c0`` of shape ``(count, k, N)`` and the 32-byte seed from
        which every ``c1 = a`` is expanded (:func:`expand_c1`).
    """
    r = ring_for(sk.params)
    count = m_ntt.shape[0]
    seed = secrets.token_bytes(SEED_BYTES)
    a = r.uniform((count,), seed=seed)
    e = r.ntt(r.to_rns(r.error(count)))
    c0 = (m_ntt + e + r.qcol - r.mul(a, sk.s_ntt[None])) % r.qcol
    return c0, seed


def expand_c1(params: Params, seed: bytes, count: int) -> U64:
    """Re-derive the ``c1`` parts of a seeded batch of ``count`` ciphertexts."""
    return ring_for(params).uniform((count,), seed=seed)


def encrypt_public(pk: PublicKey, m_ntt: U64) -> tuple[U64, U64]:
    """Encrypt NTT-domain messages ``(count, k, N)`` with the public key -> ``(c0, c1)``."""
    r = ring_for(pk.params)
    count = m_ntt.shape[0]
    u = r.ntt(r.to_rns(r.ternary(count)))
    e0 = r.ntt(r.to_rns(r.error(count)))
    e1 = r.ntt(r.to_rns(r.error(count)))
    c0 = (r.mul(pk.b[None], u) + e0 + m_ntt) % r.qcol
    c1 = (r.mul(pk.a[None], u) + e1) % r.qcol
    return c0, c1


def decrypt_coeffs(sk: SecretKey, parts: list[U64]) -> I64:
    """Decrypt a size-2/3 NTT-domain ciphertext ``[c0, c1(, c2)]`` to signed coefficients."""
    r = ring_for(sk.params)
    k = parts[0].shape[-2]
    acc = parts[0] + r.mul(parts[1], sk.s_ntt[:k])
    if len(parts) == 3:
        acc = acc + r.mul(parts[2], sk.s2_ntt[:k])
    return r.from_rns(r.intt(acc % r.qcol[:k]))
