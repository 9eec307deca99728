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
def _ntt_rows(rows: U64, prime_idx: I64, qs: U64, tables: U64) -> None:
    for r in numba.prange(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _ntt_inplace(rows[r], qs[k], tables[k])


@numba.njit(cache=True, parallel=True)
def _intt_rows(rows: U64, prime_idx: I64, qs: U64, tables: U64, n_invs: U64) -> None:
    for r in numba.prange(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _intt_inplace(rows[r], qs[k], tables[k], n_invs[k])


@numba.njit(cache=True, nogil=True)
def _ntt_rows_serial(rows: U64, prime_idx: I64, qs: U64, tables: U64) -> None:
    for r in range(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _ntt_inplace(rows[r], qs[k], tables[k])


@numba.njit(cache=True, nogil=True)
def _intt_rows_serial(rows: U64, prime_idx: I64, qs: U64, tables: U64, n_invs: U64) -> None:
    for r in range(rows.shape[0]):  # pragma: no cover - jit
        k = prime_idx[r]
        _intt_inplace(rows[r], qs[k], tables[k], n_invs[k])


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

    def _run(self, a: U64, first: int, inverse: bool) -> U64:
        out = np.ascontiguousarray(a, dtype=np.uint64).copy()
        k = out.shape[-2]
        rows = out.reshape(-1, self.n)
        idx = np.tile(np.arange(first, first + k, dtype=np.int64), rows.shape[0] // k)
        if rows.shape[0] <= SERIAL_ROWS:  # a verify's few rows: no thread pool, no lock
            if inverse:
                _intt_rows_serial(rows, idx, self.q, self._inv, self._ninv)
            else:
                _ntt_rows_serial(rows, idx, self.q, self._fwd)
            return out
        with PARALLEL_LOCK:
            if inverse:
                _intt_rows(rows, idx, self.q, self._inv, self._ninv)
            else:
                _ntt_rows(rows, idx, self.q, self._fwd)
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
