"""Public ring arithmetic over SEAL's RNS/NTT data: the cloud's fast path.

Nothing here touches a secret key or draws randomness: key generation, encryption,
decryption and every random sample run in Microsoft SEAL (:mod:`cipherface.crypto.seal`).
This module only transforms *public* residue arrays the way SEAL does, so the gallery's
numba multiply-accumulate can work on SEAL ciphertexts directly:

* the forward transform is SEAL's ``ntt_negacyclic_harvey``: negacyclic, output in
  bit-reversed order, with the **minimal** primitive ``2N``-th root of unity mod each
  prime (SEAL's ``try_minimal_primitive_root``); tests check it against SEAL's own
  encryption, decryption and ``Evaluator`` bit for bit;
* :meth:`Ring.rescale_ntt` is SEAL's ``rescale_to_next`` (``divide_and_round_q_last``).

Arrays: a polynomial in RNS form is ``uint64[k, N]`` (``k`` primes), values in ``[0, q_i)``.
"""

from __future__ import annotations

import threading
from functools import cache

import numba
import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

MAX_BLOCKS = 1 << 13  # 2^13 blocks of N=4096 = 33 M templates per gallery result

#: numba's fallback "workqueue" threading layer aborts the process when two threads run
#: parallel kernels at once; every parallel kernel call takes this lock (each call
#: already uses every core, so nothing is lost).
PARALLEL_LOCK = threading.Lock()


# Butterflies multiply by a fixed twiddle ``w`` with Shoup's trick instead of ``%`` (a
# 64-bit division that does not vectorise): with ``w' = floor(w * 2^32 / q)``, ``q < 2^30``
# and ``x < 2^32``, ``x*w - ((x*w') >> 32) * q`` is ``x*w mod q`` or that plus ``q``. Every
# reduction is ``min(y, y - q)``: unsigned, ``y - q`` wraps above ``y`` when ``y < q``
# (branch free). Outputs are fully reduced, identical to SEAL's. The two halves of a
# butterfly group are separate slices so that LLVM vectorises the inner loop (~3x).
@numba.njit(cache=True, nogil=True)
def _ntt_inplace(a: U64, q: np.uint64, w: U64, ws: U64) -> None:  # pragma: no cover - jit
    n = a.shape[0]
    sh = np.uint64(32)
    t = n
    m = 1
    while m < n:
        t //= 2
        for i in range(m):
            j1 = 2 * i * t
            s = w[m + i]
            s2 = ws[m + i]
            lo = a[j1 : j1 + t]
            hi = a[j1 + t : j1 + 2 * t]
            for j in range(t):
                u = lo[j]
                x = hi[j]
                v = x * s - ((x * s2) >> sh) * q
                v = min(v, v - q)
                y = u + v
                lo[j] = min(y, y - q)
                z = u + q - v
                hi[j] = min(z, z - q)
        m *= 2


@numba.njit(cache=True, nogil=True)
def _intt_inplace(
    a: U64, q: np.uint64, w: U64, ws: U64, n_inv: np.uint64, n_inv_s: np.uint64
) -> None:  # pragma: no cover - jit
    n = a.shape[0]
    sh = np.uint64(32)
    t = 1
    m = n
    while m > 1:
        j1 = 0
        h = m // 2
        for i in range(h):
            s = w[h + i]
            s2 = ws[h + i]
            lo = a[j1 : j1 + t]
            hi = a[j1 + t : j1 + 2 * t]
            for j in range(t):
                u = lo[j]
                v = hi[j]
                y = u + v
                lo[j] = min(y, y - q)
                x = u + q - v
                z = x * s - ((x * s2) >> sh) * q
                hi[j] = min(z, z - q)
            j1 += 2 * t
        t *= 2
        m //= 2
    for j in range(n):
        x = a[j]
        z = x * n_inv - ((x * n_inv_s) >> sh) * q
        a[j] = min(z, z - q)


@numba.njit(cache=True, parallel=True)
def _ntt_rows(rows: U64, prime_idx: I64, qs: U64, tables: U64, shoup: U64) -> None:
    for r in numba.prange(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _ntt_inplace(rows[r], qs[k], tables[k], shoup[k])


@numba.njit(cache=True, parallel=True)
def _intt_rows(
    rows: U64, prime_idx: I64, qs: U64, tables: U64, shoup: U64, n_invs: U64, n_inv_s: U64
) -> None:
    for r in numba.prange(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _intt_inplace(rows[r], qs[k], tables[k], shoup[k], n_invs[k], n_inv_s[k])


@numba.njit(cache=True, nogil=True)
def _ntt_rows_serial(rows: U64, prime_idx: I64, qs: U64, tables: U64, shoup: U64) -> None:
    for r in range(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _ntt_inplace(rows[r], qs[k], tables[k], shoup[k])


@numba.njit(cache=True, nogil=True)
def _intt_rows_serial(
    rows: U64, prime_idx: I64, qs: U64, tables: U64, shoup: U64, n_invs: U64, n_inv_s: U64
) -> None:
    for r in range(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _intt_inplace(rows[r], qs[k], tables[k], shoup[k], n_invs[k], n_inv_s[k])


@numba.njit(cache=True, nogil=True, inline="always")
def _mulmod(a: np.uint64, b: np.uint64, q: np.uint64, qinv: float) -> np.uint64:  # pragma: no cover
    """``a*b mod q`` for ``a, b < q < 2^30`` without a division: the quotient of the
    (< 2^60) product from doubles is off by at most one, which the two corrections fix."""
    x = a * b
    r = np.int64(x) - np.int64(np.float64(x) * qinv) * np.int64(q)
    if r < 0:
        r += np.int64(q)
    if r >= np.int64(q):
        r -= np.int64(q)
    return np.uint64(r)


@numba.njit(cache=True, nogil=True)
def _mul_rescale(
    x: U64,
    y: U64,
    f0: U64,
    f1: U64,
    q: U64,
    fwd0: U64,
    fwd0_s: U64,
    inv1: U64,
    inv1_s: U64,
    ninv1: np.uint64,
    ninv1_s: np.uint64,
    q1inv: np.uint64,
    q1inv_s: np.uint64,
    out: U64,
) -> None:  # pragma: no cover - jit
    """:meth:`Ring.mul_rescale_ntt` in one pass: per product component, its ``q1`` row
    to coefficients, flood, centre, back to ``q0`` and NTT, then ``(c - r) / q1``."""
    n = x.shape[2]
    q0, q1 = q[0], q[1]
    qi0, qi1 = 1.0 / np.float64(q0), 1.0 / np.float64(q1)
    half = q1 // np.uint64(2)
    shift = q0 - q1 % q0  # -q1 mod q0
    sh = np.uint64(32)
    row = np.empty(n, dtype=np.uint64)
    p0 = np.empty(n, dtype=np.uint64)
    for c in range(3):
        for s in range(n):
            for k in range(2):
                qk = q[k]
                qi = qi0 if k == 0 else qi1
                if c == 0:
                    v = _mulmod(x[0, k, s], y[0, k, s], qk, qi)
                elif c == 2:
                    v = _mulmod(x[1, k, s], y[1, k, s], qk, qi)
                else:
                    v = _mulmod(x[0, k, s], y[1, k, s], qk, qi) + _mulmod(
                        x[1, k, s], y[0, k, s], qk, qi
                    )
                    v = min(v, v - qk)
                if k == 0:
                    p0[s] = v
                else:
                    row[s] = v
        _intt_inplace(row, q1, inv1, inv1_s, ninv1, ninv1_s)
        for s in range(n):
            a = row[s]
            if c == 0:
                a = a + f1[s]
                a = min(a, a - q1)
            # centred residue of c mod q1, taken mod q0 (SEAL's rounding)
            r = a % q0 if a <= half else (a + shift) % q0
            if c == 0:
                r = r + q0 - f0[s]  # subtract r, add F
                r = min(r, r - q0)
            row[s] = r
        _ntt_inplace(row, q0, fwd0, fwd0_s)
        for s in range(n):
            d = p0[s] + q0 - row[s]
            d = min(d, d - q0)
            z = d * q1inv - ((d * q1inv_s) >> sh) * q0
            out[c, 0, s] = min(z, z - q0)


def _shoup(w: U64, q: int) -> U64:
    """Shoup's companions ``floor(w * 2^32 / q)`` of twiddles ``w < q``."""
    return np.array([(int(x) << 32) // q for x in w], dtype=np.uint64)


#: At most this many rows run on one thread: starting the parallel pool costs more.
SERIAL_ROWS = 4


def _bitrev(n: int) -> I64:
    bits = n.bit_length() - 1
    idx = np.arange(n)
    rev = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    return rev


def minimal_root(q: int, order: int) -> int:
    """The smallest primitive ``order``-th root of unity mod prime ``q`` (SEAL's choice)."""
    for x in range(2, q):
        g = pow(x, (q - 1) // order, q)
        if pow(g, order // 2, q) == q - 1:
            break
    else:  # pragma: no cover - q = 1 mod order always has one
        raise ValueError(f"no primitive {order}-th root mod {q}")
    best, cur, g2 = g, g, g * g % q
    for _ in range(order // 2 - 1):  # the primitive roots are the odd powers of g
        cur = cur * g2 % q
        best = min(best, cur)
    return best


class Ring:
    """NTT tables and public polynomial operations for ``Z_q[X]/(X^N+1)``, ``q`` = ``primes``."""

    def __init__(self, n: int, primes: tuple[int, ...]) -> None:
        if any(not 2 < q < 1 << 30 for q in primes):
            raise ValueError("the NTT kernels need primes below 2^30")
        self.n = n
        self.k = len(primes)
        self.primes = primes
        self.q = np.array(primes, dtype=np.uint64)
        self.qcol = self.q[:, None]
        rev = _bitrev(n)
        fwd, inv, ninv = [], [], []
        for q in primes:
            psi = minimal_root(q, 2 * n)
            ipsi = pow(psi, -1, q)
            fwd.append(np.array([pow(psi, int(e), q) for e in range(n)], dtype=np.uint64)[rev])
            inv.append(np.array([pow(ipsi, int(e), q) for e in range(n)], dtype=np.uint64)[rev])
            ninv.append(pow(n, -1, q))
        self._fwd = np.ascontiguousarray(np.stack(fwd))
        self._inv = np.ascontiguousarray(np.stack(inv))
        self._ninv = np.array(ninv, dtype=np.uint64)
        self._fwd_s = np.stack([_shoup(t, q) for t, q in zip(fwd, primes)])
        self._inv_s = np.stack([_shoup(t, q) for t, q in zip(inv, primes)])
        self._ninv_s = np.array([(x << 32) // q for x, q in zip(ninv, primes)], dtype=np.uint64)

    def _run(self, a: U64, first: int, inverse: bool) -> U64:
        out = np.ascontiguousarray(a, dtype=np.uint64).copy()
        k = out.shape[-2]
        rows = out.reshape(-1, self.n)
        idx = np.tile(np.arange(first, first + k, dtype=np.int64), rows.shape[0] // k)
        inv = (self._inv, self._inv_s, self._ninv, self._ninv_s)
        if rows.shape[0] <= SERIAL_ROWS:  # a verify's few rows: no thread pool, no lock
            if inverse:
                _intt_rows_serial(rows, idx, self.q, *inv)
            else:
                _ntt_rows_serial(rows, idx, self.q, self._fwd, self._fwd_s)
            return out
        with PARALLEL_LOCK:
            if inverse:
                _intt_rows(rows, idx, self.q, *inv)
            else:
                _ntt_rows(rows, idx, self.q, self._fwd, self._fwd_s)
        return out

    def ntt(self, a: U64, *, first: int = 0) -> U64:
        """Forward NTT of ``(..., k', N)`` residues for primes ``first .. first+k'-1``; a copy."""
        return self._run(a, first, inverse=False)

    def intt(self, a: U64, *, first: int = 0) -> U64:
        """Inverse of :meth:`ntt`; returns a copy."""
        return self._run(a, first, inverse=True)

    def to_rns(self, x: I64, primes: int | None = None) -> U64:
        """Signed integers ``(..., N)`` -> residues ``(..., k, N)``."""
        k = self.k if primes is None else primes
        x = np.asarray(x, dtype=np.int64)
        return np.stack([np.mod(x, int(q)).astype(np.uint64) for q in self.primes[:k]], -2)

    def centred(self, r: U64, prime: int = 0) -> I64:
        """Residues mod one prime -> signed integers in ``(-q/2, q/2]``."""
        q = int(self.q[prime])
        x = r.astype(np.int64)
        return np.where(x > q // 2, x - q, x)

    def mul(self, a: U64, b: U64) -> U64:
        """Elementwise product mod q of NTT-domain arrays (residues < 2^30: no overflow)."""
        k = a.shape[-2]
        return (a * b) % self.qcol[:k]

    def monomial_ntt(self, power: int) -> U64:
        """NTT of ``X^power`` (negacyclic: ``X^N = -1``), shape ``(k, N)``."""
        e = np.zeros(self.n, dtype=np.int64)
        p = power % (2 * self.n)
        if p < self.n:
            e[p] = 1
        else:
            e[p - self.n] = -1
        return self.ntt(self.to_rns(e))

    def mul_rescale_ntt(self, x: U64, y: U64, flood: tuple[U64, U64]) -> U64:
        """``rescale_ntt(product(x, y), flood)`` in one pass (a verify's finish).

        SEAL's ``multiply`` (no relinearisation) of two size-2 NTT ciphertexts at
        ``(q0, q1)``, ``add_plain`` of the flood, ``rescale_to_next``: bit for bit the
        same as the three steps (tests/test_seal.py), without numpy's temporaries.

        Args:
            x / y: ``(2, 2, N)`` NTT residues (size 2, primes q0 q1), values ``< q``.
            flood: coefficient-domain residues ``(F mod q0, F mod q1)``, shape ``(N,)``.

        Returns:
            ``(3, 1, N)`` at ``q0``, NTT domain.
        """
        if self.k != 2 or x.shape != (2, 2, self.n) or y.shape != (2, 2, self.n):
            raise ValueError("mul_rescale_ntt takes two size-2 ciphertexts at (q0, q1)")
        q0, q1 = int(self.q[0]), int(self.q[1])
        q1inv = pow(q1, -1, q0)
        out = np.empty((3, 1, self.n), dtype=np.uint64)
        _mul_rescale(
            np.ascontiguousarray(x, dtype=np.uint64),
            np.ascontiguousarray(y, dtype=np.uint64),
            np.ascontiguousarray(flood[0], dtype=np.uint64),
            np.ascontiguousarray(flood[1], dtype=np.uint64),
            self.q,
            self._fwd[0],
            self._fwd_s[0],
            self._inv[1],
            self._inv_s[1],
            self._ninv[1],
            self._ninv_s[1],
            np.uint64(q1inv),
            np.uint64((q1inv << 32) // q0),
            out,
        )
        return out

    def rescale_ntt(self, c: U64, flood: tuple[U64, U64] | None = None) -> U64:
        """SEAL's ``add_plain`` (optional) then ``rescale_to_next`` on ``(..., s, 2, N)`` NTT data.

        Args:
            c: size-``s`` ciphertexts at primes ``(q0, q1)``, NTT domain (any leading
                batch shape: one call transforms a whole batch).
            flood: coefficient-domain residues ``(F mod q0, F mod q1)``, shape
                ``(..., N)``, added to each ``c0`` first (SEAL: ``add_plain`` of ``NTT(F)``).

        Returns:
            ``(..., s, 1, N)`` at ``q0``, NTT domain: ``(c - r) / q1`` with ``r`` the
            centred residue of ``c mod q1``, exactly as SEAL rounds.
        """
        q0, q1 = int(self.q[0]), int(self.q[1])
        last = self.intt(c[..., 1:2, :], first=1)[..., 0, :]  # (..., s, N) coefficients mod q1
        if flood is not None:
            last[..., 0, :] = (last[..., 0, :] + flood[1]) % np.uint64(q1)
        r = self.centred(last, 1)  # SEAL adds q1/2, reduces, subtracts q1/2: the same
        r0 = np.mod(r, q0).astype(np.uint64)
        if flood is not None:  # subtract r, add F
            r0[..., 0, :] = (r0[..., 0, :] + np.uint64(q0) - flood[0]) % np.uint64(q0)
        r_ntt = self.ntt(r0[..., None, :])[..., 0, :]
        diff = (c[..., 0, :] + np.uint64(q0) - r_ntt) % np.uint64(q0)
        return ((diff * np.uint64(pow(q1, -1, q0))) % np.uint64(q0))[..., None, :]


@cache
def ring_for(n: int, primes: tuple[int, ...]) -> Ring:
    """Ring tables are deterministic in the parameters: build once per process."""
    return Ring(n, primes)
