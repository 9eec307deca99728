"""Paillier, Damgård–Jurik and Okamoto–Uchiyama on gmpy2, with a CSPRNG and fast CRT paths.

This module holds the three additively homomorphic schemes of ``CipherFaceLite`` and the
fixed-point encoding shared by the edge and the cloud (:class:`Packing`). The gallery
engine that packs templates into ciphertexts is :mod:`cipherface.crypto.phe_gallery`.

Why not LightPHE (which cipherface 0.0.2 used)? It is pure Python ints, draws keys and
randomness from ``random`` / ``sympy.randprime`` (not a CSPRNG), can return an ``n``
shorter than asked, reads keys back with ``eval``, and its Damgård–Jurik encrypts with
``r^n`` instead of ``r^(n^s)`` so only plaintexts below ``n`` decrypt. The arithmetic here
is the textbook one, re-implemented on gmpy2; LightPHE is kept as a cross-check in the
tests (LightPHE decrypts our ciphertexts under the same key and vice versa).

Schemes (``g = 1 + n`` for the Paillier family, so ``g^m`` is a binomial sum, not an
exponentiation):

* Paillier: ``c = (1+n)^m r^n mod n^2``, plaintexts mod ``n``.
* Damgård–Jurik (parameter ``s``, default 2): ``c = (1+n)^m r^(n^s) mod n^(s+1)``,
  plaintexts mod ``n^s`` -- ``s`` times the room of Paillier per ciphertext.
* Okamoto–Uchiyama (**legacy**, kept for cipherface 0.0.2 compatibility): ``n = p^2 q``,
  ``c = g^m h^r mod n`` with ``h = g^n``; plaintexts mod ``p`` (a third of ``n``). It is
  totally broken under chosen-ciphertext attack: one decryption of a chosen ciphertext
  (``g^x`` with ``x > p``) reveals a multiple of ``p`` and factors ``n``. Choosing it
  warns (:class:`LegacySchemeWarning`); prefer Paillier or CKKS.

Randomness and speed:

* Every random number comes from :mod:`secrets`. Primes are ``gmpy2.next_prime`` of a
  CSPRNG point, re-checked with ``gmpy2.is_prime(., 64)``; ``n`` has exactly the
  requested size (both primes have their two top bits set).
* Decryption uses the CRT: ``c^(p-1) mod p^(s+1)`` and Damgård–Jurik's discrete log in
  ``1 + pZ``, then the same for ``q``; ``s = 1`` is Paillier's CRT decryption.
* Encryption with the secret key (the edge) is exact and fast: the ``n^s``-th residues
  mod ``p^(s+1)`` form the cyclic subgroup of order ``p - 1``; key generation makes
  ``p - 1 = 2 c p1`` with ``p1`` a large prime and ``c < 2^34`` (so its factors are known
  and a generator ``G_p`` is found), and ``G_p^a`` with ``a`` uniform mod ``p - 1``,
  combined with the ``q`` side by the CRT, is *exactly* a uniform ``r^(n^s)`` -- the same
  distribution as textbook encryption -- computed with a fixed-base table in ~|p|/8
  multiplications mod ``p^(s+1)``. Keys without that structure (imported) fall back to
  ``y^(p^s) mod p^(s+1)`` for uniform ``y``, equally exact, ~5x slower.
* Encryption with the public key only is textbook (``r`` uniform, one full
  exponentiation). Rerandomising many results in the cloud uses
  :class:`Rerandomizer` (see there for its security argument).
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import gmpy2
import numpy as np
import numpy.typing as npt
from gmpy2 import mpz

from cipherface.crypto.keyfile import (
    MAGIC,
    KeyFile,
    fingerprint,
    key_file_bytes,
    load_key_file,
    parse_key_bytes,
    save_key_file,
)
from cipherface.crypto.wire import unpack_bounded
from cipherface.errors import (
    InsecureParametersError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    LocalError,
    PayloadTooLargeError,
    PublicKeyOnlyError,
)

__all__ = [
    "ALGORITHM_NAMES",
    "DAMGARD_JURIK",
    "DEFAULT_BITS",
    "DEFAULT_DJ_S",
    "DEFAULT_MASK_BITS",
    "KEY_SIZES",
    "MAX_BITS",
    "MAX_DJ_S",
    "MIN_BITS",
    "OKAMOTO_UCHIYAMA",
    "PAILLIER",
    "SCHEMES",
    "SECURITY_BITS",
    "TABLE_BYTES",
    "FixedBase",
    "Packing",
    "PhePrivateKey",
    "PhePublicKey",
    "Rerandomizer",
    "bits_for_security",
    "default_precision",
    "generate_private_key",
    "load_key",
    "public_key_from_bytes",
    "table_window",
]

PAILLIER: Final = "paillier"
DAMGARD_JURIK: Final = "damgard-jurik"
OKAMOTO_UCHIYAMA: Final = "okamoto-uchiyama"
SCHEMES: Final = (PAILLIER, DAMGARD_JURIK, OKAMOTO_UCHIYAMA)


class LegacySchemeWarning(UserWarning):
    """A scheme kept only for compatibility (Okamoto–Uchiyama) was chosen."""


def warn_legacy_ou() -> None:
    """Warn that Okamoto–Uchiyama is legacy: one chosen-ciphertext decryption factors n."""
    warnings.warn(
        "okamoto-uchiyama is a legacy scheme: a single decryption of a chosen ciphertext "
        "factors its modulus (chosen-ciphertext insecure); use paillier or ckks",
        LegacySchemeWarning,
        stacklevel=3,
    )


#: cipherface 0.0.2's ``algorithm_name`` spelling -> ours.
ALGORITHM_NAMES: Final = {
    "Paillier": PAILLIER,
    "Damgard-Jurik": DAMGARD_JURIK,
    "Okamoto-Uchiyama": OKAMOTO_UCHIYAMA,
}

#: Smallest modulus accepted: 112-bit security (NIST SP 800-57 equivalent of RSA-2048).
MIN_BITS: Final = 2048
#: Default modulus: 128-bit security.
DEFAULT_BITS: Final = 3072
#: Security level (bits) -> modulus size, NIST SP 800-57 part 1 table 2.
SECURITY_BITS: Final = {112: 2048, 128: 3072, 192: 7680, 256: 15360}
#: The only modulus sizes accepted (generated, loaded or received): the levels above.
#: A peer's public key sizes the cloud's tables and work, so nothing else gets in.
KEY_SIZES: Final = tuple(sorted(SECURITY_BITS.values()))
MAX_BITS: Final = KEY_SIZES[-1]
DEFAULT_DJ_S: Final = 2
MAX_DJ_S: Final = 4
#: Cap on Damgard-Jurik's ``s * bits`` (plaintext size): ciphertexts stay below
#: ``MAX_BITS + bits`` bits, so one ciphertext operation is never dearer than at 15360 bits.
MAX_DJ_BITS: Final = MAX_BITS
#: Memory cap of one fixed-base table (bytes): the window shrinks to fit (:class:`FixedBase`),
#: so a gallery worker holds at most two tables (OU), ~128 MiB, whatever key it is sent.
TABLE_BYTES: Final = 64 * 1024 * 1024
#: Largest public key file accepted from the network (OU at 15360 bits is ~12 KB).
MAX_PUBLIC_KEY_BYTES: Final = 64 * 1024
#: Statistical hiding of masked slots: 2^-40 statistical distance per slot.
DEFAULT_MASK_BITS: Final = 40
MIN_MASK_BITS: Final = 32
#: Miller-Rabin rounds on top of GMP's trial division and Baillie-PSW.
PRIME_ROUNDS: Final = 64
#: Target of the worst-case score error of the fixed-point encoding.
SCORE_ERROR: Final = 1e-4
MAX_DIM: Final = 1 << 16


# --------------------------------------------------------------------------- helpers
def _randbelow(n: Any) -> Any:
    return mpz(secrets.randbelow(int(n)))


def _rand_range(lo: Any, hi: Any) -> Any:
    """Uniform in ``[lo, hi)`` from the CSPRNG."""
    return mpz(lo) + _randbelow(mpz(hi) - mpz(lo))


@functools.cache
def _small_primes(limit: int = 1 << 17) -> tuple[int, ...]:
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i :: i] = False
    return tuple(int(x) for x in np.flatnonzero(sieve))


@functools.cache
def _primorial(limit: int = 2000) -> Any:
    # One gcd against this rejects ~85% of candidates before a Miller-Rabin test.
    out = mpz(1)
    for p in _small_primes():
        if p >= limit:
            break
        out *= p
    return out


def _random_prime(lo: Any, hi: Any) -> Any:
    """A prime in ``[lo, hi)``: next prime after a CSPRNG point, retried on overshoot."""
    while True:
        p = gmpy2.next_prime(_rand_range(lo, hi) - 1)
        if p < hi and gmpy2.is_prime(p, PRIME_ROUNDS):
            return p


def _factor_small(c: int) -> list[int]:
    """Distinct prime factors of ``c < 2^34`` by trial division up to 2^17."""
    out = []
    for p in _small_primes():
        if p * p > c:
            break
        if c % p == 0:
            out.append(p)
            while c % p == 0:
                c //= p
    if c > 1:
        out.append(c)  # no factor below 2^17 and c < 2^34: c is prime
    return out


def _structured_prime(lo: Any, hi: Any) -> tuple[Any, list[int]]:
    """A prime ``p`` in ``[lo, hi)`` (``hi = 2^k``) with ``p - 1 = 2 c p1``, ``p1`` prime.

    ``c < 2^34`` is factored by trial division, so the whole factorisation of ``p - 1``
    is known and a generator of ``Z_p^*`` can be certified. ``p - 1`` having a large
    prime factor is what "strong prime" rules ask for anyway (no ``p - 1`` attack).
    """
    k = int(hi).bit_length() - 1
    sieve = _primorial()
    while True:
        p1 = _random_prime(mpz(1) << (k - 35), mpz(1) << (k - 34))
        c_lo = (mpz(lo) - 1 + 2 * p1 - 1) // (2 * p1)
        c_hi = (mpz(hi) - 2) // (2 * p1)
        for _ in range(20000):
            c = _rand_range(c_lo, c_hi + 1)
            p = 2 * c * p1 + 1
            if gmpy2.gcd(p, sieve) != 1 or not gmpy2.is_prime(p, PRIME_ROUNDS):
                continue
            if not lo <= p < hi:  # pragma: no cover - excluded by the c range
                continue
            return p, sorted({2, int(p1), *_factor_small(int(c))})


def _check_factors(p: Any, factors: Sequence[int]) -> None:
    """Raise unless ``factors`` are exactly the distinct primes of ``p - 1``."""
    rest = mpz(p) - 1
    for f in factors:
        if f < 2 or not gmpy2.is_prime(f, 32) or rest % f:
            raise KeyFileError("private key: bad factorisation of p - 1")
        while rest % f == 0:
            rest //= f
    if rest != 1:
        raise KeyFileError("private key: incomplete factorisation of p - 1")


def _primitive_root(p: Any, factors: Sequence[int]) -> Any:
    """A random generator of ``Z_p^*`` (certified by the factors of ``p - 1``)."""
    exps = [(mpz(p) - 1) // f for f in factors]
    while True:
        y = _rand_range(2, p - 1)
        if all(gmpy2.powmod(y, e, p) != 1 for e in exps):
            return y


def _dj_log(a: Any, prime: Any, s: int, pows: Sequence[Any], invfact: Sequence[Any]) -> Any:
    """Damgård–Jurik's algorithm: ``i mod P^s`` with ``(1+P)^i = a (mod P^(s+1))``.

    ``pows[j] = P^j`` for ``j <= s+1``; ``invfact[j][k] = (k!)^-1 mod P^j``.
    """
    i = mpz(0)
    for j in range(1, s + 1):
        pj = pows[j]
        t1 = ((a % pows[j + 1]) - 1) // prime
        t2 = i
        for k in range(2, j + 1):
            i -= 1
            t2 = t2 * i % pj
            t1 = (t1 - t2 * pows[k - 1] * invfact[j][k]) % pj
        i = t1
    return i


def _one_plus_n_pow(m: Any, n: Any, s: int, modulus: Any) -> Any:
    """``(1+n)^m mod n^(s+1)`` by the binomial theorem (no exponentiation needed)."""
    out = mpz(1)
    term = mpz(1)
    npow = mpz(1)
    for k in range(1, s + 1):
        term = term * (m - k + 1) // k  # C(m, k), exact at every step
        npow *= n
        out += term * npow
    return out % modulus


def _hex(x: Any) -> str:
    return format(int(x), "x")


def _parse_hex(value: object, what: str, max_bits: int) -> Any:
    if not isinstance(value, str) or not 0 < len(value) <= max_bits // 4 + 1:
        raise KeyFileError(f"key file: {what} is missing or not a hex string of sane length")
    if value.strip("0123456789abcdef"):
        raise KeyFileError(f"key file: {what} is not lowercase hex")
    return mpz(value, 16)


def bits_for_security(security_level: int) -> int:
    """Modulus size for a security level (112, 128, 192 or 256 bits).

    Raises:
        InsecureParametersError: below 112 bits (cipherface 0.0.2's default 80 included).
        InvalidArgumentError: an unknown level.
    """
    if not isinstance(security_level, int) or isinstance(security_level, bool):
        raise InvalidArgumentError(f"security_level must be an int, not {security_level!r}")
    if security_level < 112:
        raise InsecureParametersError(
            f"security level {security_level} is below 112 bits (RSA-2048 equivalent); "
            "use 112 (2048-bit keys) or 128 (3072-bit, the default)"
        )
    if security_level not in SECURITY_BITS:
        raise InvalidArgumentError(
            f"security level {security_level} is not one of {sorted(SECURITY_BITS)}"
        )
    return SECURITY_BITS[security_level]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise InvalidArgumentError(f"key size must be an int, not {bits!r}")
    if bits < MIN_BITS:
        raise InsecureParametersError(
            f"a {bits}-bit modulus is below the {MIN_BITS}-bit minimum (112-bit security); "
            f"use {MIN_BITS} or {DEFAULT_BITS} (128-bit security, the default)"
        )
    if bits not in KEY_SIZES:
        raise InvalidArgumentError(
            f"key size {bits} is not one of {list(KEY_SIZES)} (security levels "
            f"{sorted(SECURITY_BITS)})"
        )


def _check_dj_s(s: object, bits: int) -> int:
    """Damgard-Jurik's ``s``: an int in ``1..MAX_DJ_S`` with ``s * bits <= MAX_DJ_BITS``."""
    if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= MAX_DJ_S:
        raise InvalidArgumentError(f"Damgard-Jurik s must be an int in 1..{MAX_DJ_S}, not {s!r}")
    if s * bits > MAX_DJ_BITS:
        raise InvalidArgumentError(
            f"Damgard-Jurik s={s} at {bits} bits exceeds s*bits <= {MAX_DJ_BITS}"
        )
    return s


def default_precision(dim: int) -> int:
    """Fractional bits ``f`` of templates and probes for a ``dim``-d embedding.

    Rounding each coordinate of two unit vectors to ``2^-f`` moves their dot product by at
    most ``sqrt(d) 2^-f + d 2^-(2f+2)`` (Cauchy-Schwarz on the rounding errors, each at most
    ``2^-(f+1)``). This returns the smallest ``f`` keeping that below :data:`SCORE_ERROR`
    (1e-4): 17 bits for d=128, 18 for 512, 20 for 4096.
    """
    for f in range(8, 31):
        if math.sqrt(dim) * 2.0**-f + dim * 2.0 ** (-2 * f - 2) <= SCORE_ERROR:
            return f
    raise InvalidArgumentError(f"no precision up to 30 bits reaches 1e-4 for dim {dim}")


# ------------------------------------------------------------------- fixed-base powers
class FixedBase:
    """``base^e mod m`` for many exponents ``e < 2^exp_bits`` with a fixed-window table.

    ``rows[i][v] = base^(v 2^(w i))`` for ``w``-bit digits: a power costs one
    multiplication per nonzero digit of the exponent (Brickell-Gordon-McCurley-Wilson).
    The table holds ``(2^w - 1) ceil(exp_bits / w)`` residues. ``w`` is the widest of 8..1
    bits whose table fits ``max_bytes`` (:func:`table_window`): 8 (bytes) up to 3072-bit
    keys, narrower for the large ones, so that a key -- possibly a peer's -- never makes
    a process hold more than ``max_bytes`` per table (8.4 MB for 1024-bit exponents mod a
    2048-bit modulus; 45 MB with ``w = 2`` for Paillier-15360's rerandomiser).

    Args:
        base: the fixed base.
        mod: the modulus.
        exp_bits: exponents are below ``2^exp_bits``.
        max_bytes: memory cap of the table (:data:`TABLE_BYTES` by default).
    """

    __slots__ = ("mod", "ndigits", "rows", "window")

    def __init__(self, base: Any, mod: Any, exp_bits: int, *, max_bytes: int | None = None) -> None:
        self.mod = mpz(mod)
        cap = TABLE_BYTES if max_bytes is None else max_bytes
        self.window = table_window(int(self.mod).bit_length(), exp_bits, cap)
        w = self.window
        self.ndigits = -(-exp_bits // w)
        rows = []
        b = mpz(base) % self.mod
        for _ in range(self.ndigits):
            row = [mpz(1), b]
            for _v in range(2, 1 << w):
                row.append(row[-1] * b % self.mod)
            rows.append(row)
            b = row[-1] * b % self.mod
        self.rows = rows

    def nbytes(self) -> int:
        """Memory held by the residues of the table (``sys.getsizeof`` of each)."""
        return sum(sys.getsizeof(x) for row in self.rows for x in row)

    def pow(self, e: Any) -> Any:
        """Return ``base^e mod m`` for ``0 <= e < 2^(w * ndigits)``."""
        acc = None
        mod = self.mod
        if self.window == 8:
            digits: Iterator[int] = iter(mpz(e).to_bytes(self.ndigits, "little"))
        else:
            digits = _digits(int(e), self.window, self.ndigits)
        for row, v in zip(self.rows, digits):
            if v:
                acc = row[v] if acc is None else acc * row[v] % mod
        return mpz(1) if acc is None else acc


def _digits(e: int, w: int, count: int) -> Iterator[int]:
    mask = (1 << w) - 1
    for _ in range(count):
        yield e & mask
        e >>= w


def table_window(mod_bits: int, exp_bits: int, max_bytes: int) -> int:
    """Widest window (8..1 bits) whose :class:`FixedBase` table fits ``max_bytes``.

    A residue costs its limbs plus ~40 bytes of mpz header and an 8-byte list slot; ``w = 1``
    is returned when even that does not fit (``exp_bits`` residues).
    """
    entry = (mod_bits + 63) // 64 * 8 + 48
    for w in range(8, 1, -1):
        if ((1 << w) - 1) * -(-exp_bits // w) * entry <= max_bytes:
            return w
    return 1


# ---------------------------------------------------------------------------- keys
@dataclass(frozen=True, kw_only=True, eq=False)
class PhePublicKey:
    """A public key of the Paillier family, with the encoding it is used with.

    Args:
        scheme: ``"paillier"``, ``"damgard-jurik"`` or ``"okamoto-uchiyama"``.
        n: the modulus (``pq``; ``p^2 q`` for Okamoto–Uchiyama).
        bits: exact bit length of ``n``.
        s: Damgård–Jurik's exponent (ciphertexts mod ``n^(s+1)``); 1 otherwise.
        g, h: Okamoto–Uchiyama's ``g`` and ``h = g^n mod n``; 0 otherwise.
        pbits: Okamoto–Uchiyama's bit length of ``p`` (plaintexts below ``2^(pbits-1)``).
        dim: embedding dimension the key encodes.
        precision: fractional bits of the fixed-point encoding (:func:`default_precision`).
        mask_bits: statistical hiding of masked slots (:class:`Packing`).
        model, metric: face model and metric, for information and decisions.
    """

    scheme: str
    n: Any
    bits: int
    s: int = 1
    g: Any = 0
    h: Any = 0
    pbits: int = 0
    dim: int
    precision: int
    mask_bits: int = DEFAULT_MASK_BITS
    model: str = "Dlib"
    metric: str = "cosine"

    @functools.cached_property
    def modulus(self) -> Any:
        """Ciphertext modulus: ``n^(s+1)`` (Paillier family) or ``n`` (OU)."""
        if self.scheme == OKAMOTO_UCHIYAMA:
            return mpz(self.n)
        return mpz(self.n) ** (self.s + 1)

    @functools.cached_property
    def ct_bytes(self) -> int:
        """Bytes of one fixed-width big-endian ciphertext."""
        return (int(self.modulus).bit_length() + 7) // 8

    @functools.cached_property
    def plaintext_bits(self) -> int:
        """Every integer below ``2^plaintext_bits`` is a plaintext (packing room)."""
        if self.scheme == OKAMOTO_UCHIYAMA:
            return self.pbits - 1
        return self.s * (self.bits - 1)

    @functools.cached_property
    def key_id(self) -> str:
        """Fingerprint of the key material, the scheme and the encoding parameters."""
        parts = [self.scheme.encode(), self.n.to_bytes((self.bits + 7) // 8, "big")]
        if self.scheme == OKAMOTO_UCHIYAMA:
            parts += [mpz(self.g).to_bytes(self.ct_bytes, "big")]
            parts += [mpz(self.h).to_bytes(self.ct_bytes, "big")]
        enc = f"s={self.s};pbits={self.pbits};dim={self.dim};f={self.precision};k={self.mask_bits}"
        return fingerprint(*parts, enc.encode())

    # ------------------------------------------------------------------ operations
    def plain_mod(self, m: Any) -> Any:
        """Reduce a (possibly negative) plaintext into the range encryption takes."""
        if self.scheme == OKAMOTO_UCHIYAMA:
            return mpz(m)  # p is secret: negative exponents mean inverses of g
        return mpz(m) % (mpz(self.n) ** self.s)

    def g_pow(self, m: Any) -> Any:
        """The plaintext part ``g^m`` of an encryption (a trivial, unrandomised ciphertext)."""
        if self.scheme == OKAMOTO_UCHIYAMA:
            return gmpy2.powmod(self.g, m, self.n)
        return _one_plus_n_pow(self.plain_mod(m), mpz(self.n), self.s, self.modulus)

    def random_zero(self) -> Any:
        """A fresh, textbook encryption of 0: ``r^(n^s)`` or ``h^r``, ``r`` uniform."""
        n = mpz(self.n)
        if self.scheme == OKAMOTO_UCHIYAMA:
            return gmpy2.powmod(self.h, _randbelow(n), n)
        while True:
            r = _randbelow(n)
            if r > 1 and gmpy2.gcd(r, n) == 1:
                return gmpy2.powmod(r, n**self.s, self.modulus)

    def encrypt(self, m: Any) -> Any:
        """Encrypt an integer with the public key (textbook; one full exponentiation)."""
        return self.g_pow(m) * self.random_zero() % self.modulus

    def check_ciphertext(self, c: Any) -> bool:
        """True when ``c`` is a unit of the ciphertext ring (what any honest party sends)."""
        return 0 < c < self.modulus and gmpy2.gcd(c, self.n) == 1

    # ------------------------------------------------------------------- key files
    def _params(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "s": self.s,
            "pbits": self.pbits,
            "dim": self.dim,
            "precision": self.precision,
            "mask_bits": self.mask_bits,
            "model": self.model,
            "metric": self.metric,
        }

    def _material(self) -> dict[str, Any]:
        out = {"n": _hex(self.n)}
        if self.scheme == OKAMOTO_UCHIYAMA:
            out.update(g=_hex(self.g), h=_hex(self.h))
        return out

    def key_file(self) -> KeyFile:
        """The public key file contents: ``n`` (and OU's ``g``, ``h``), no secret."""
        return KeyFile(
            kind="public",
            scheme=self.scheme,
            key_id=self.key_id,
            params=self._params(),
            material=self._material(),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the public key file (0644)."""
        save_key_file(path, self.key_file())

    def to_bytes(self) -> bytes:
        """The public key file as bytes (what the edge publishes to the cloud)."""
        return key_file_bytes(self.key_file())

    @classmethod
    def from_key_file(cls, kf: KeyFile, *, source: str = "key file") -> PhePublicKey:
        """Build and check a public key from a key file (public or private).

        Raises:
            KeyFileError: malformed material or parameters.
            InsecureParametersError: a modulus below 2048 bits.
        """
        if kf.scheme not in SCHEMES:
            raise KeyFileError(f"{source}: {kf.scheme!r} is not a Paillier-family scheme")
        p, m = kf.params, kf.material
        ints: dict[str, int] = {}
        for k in ("bits", "s", "pbits", "dim", "precision", "mask_bits"):
            v = p.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise KeyFileError(f"{source}: parameter {k!r} is missing or not an int")
            ints[k] = v
        bits = ints["bits"]
        try:
            _check_bits(bits)
        except InvalidArgumentError as exc:
            raise KeyFileError(f"{source}: {exc}") from exc
        n = _parse_hex(m.get("n"), "n", MAX_BITS)
        if n.bit_length() != bits or n % 2 == 0:
            raise KeyFileError(f"{source}: n is not an odd {bits}-bit modulus")
        s = ints["s"]
        if kf.scheme == DAMGARD_JURIK:
            try:
                _check_dj_s(s, bits)
            except InvalidArgumentError as exc:
                raise KeyFileError(f"{source}: {exc}") from exc
        elif s != 1:
            raise KeyFileError(f"{source}: s must be 1 for {kf.scheme}")
        dim, prec, mask = ints["dim"], ints["precision"], ints["mask_bits"]
        if not 1 <= dim <= MAX_DIM or not 8 <= prec <= 30 or not MIN_MASK_BITS <= mask <= 128:
            raise KeyFileError(f"{source}: encoding parameters dim/precision/mask_bits invalid")
        g = h = mpz(0)
        pbits = ints["pbits"]
        if kf.scheme == OKAMOTO_UCHIYAMA:
            g = _parse_hex(m.get("g"), "g", MAX_BITS)
            h = _parse_hex(m.get("h"), "h", MAX_BITS)
            if not (1 < g < n and 1 < h < n) or gmpy2.powmod(g, n, n) != h:
                raise KeyFileError(f"{source}: Okamoto-Uchiyama g/h are inconsistent with n")
            if not 3 * pbits - 2 <= bits <= 3 * pbits:
                raise KeyFileError(f"{source}: pbits={pbits} does not fit a {bits}-bit p^2 q")
        elif pbits != 0:
            raise KeyFileError(f"{source}: pbits must be 0 for {kf.scheme}")
        model, metric = p.get("model", "Dlib"), p.get("metric", "cosine")
        if not isinstance(model, str) or not isinstance(metric, str):
            raise KeyFileError(f"{source}: model/metric must be strings")
        pub = cls(
            scheme=kf.scheme,
            n=n,
            bits=bits,
            s=s,
            g=g,
            h=h,
            pbits=pbits,
            dim=dim,
            precision=prec,
            mask_bits=mask,
            model=model,
            metric=metric,
        )
        try:
            Packing.for_key(pub)
        except InvalidArgumentError as exc:
            raise KeyFileError(f"{source}: {exc}") from exc
        if kf.key_id != pub.key_id:
            raise KeyFileError(f"{source}: key id {kf.key_id!r} does not match its key material")
        return pub


class _PrimeSide:
    """Precomputed constants of one prime for CRT decryption and fast encryption."""

    def __init__(self, pub: PhePublicKey, p: Any, factors: Sequence[int]) -> None:
        s, n = pub.s, mpz(pub.n)
        self.p = p
        self.pows = [p**j for j in range(s + 2)]
        self.mod = self.pows[s + 1]  # p^(s+1)
        # invfact[j][k] = (k!)^-1 mod p^j, for 2 <= k <= j <= s
        self.invfact = [
            [mpz(0), mpz(0)]
            + [gmpy2.invert(math.factorial(k), self.pows[j]) for k in range(2, j + 1)]
            for j in range(s + 1)
        ]
        base = _one_plus_n_pow(p - 1, n, s, self.mod)
        self.hinv = gmpy2.invert(self._log(base), self.pows[s])
        self.factors = list(factors)
        self._table: FixedBase | None = None
        self._lock = threading.Lock()

    def _log(self, a: Any) -> Any:
        return _dj_log(a, self.p, len(self.pows) - 2, self.pows, self.invfact)

    def decrypt_pow(self, x: Any) -> Any:
        """``m mod p^s`` from ``x = c^(p-1) mod p^(s+1)``."""
        return self._log(x) * self.hinv % self.pows[-2]

    def zero(self) -> Any:
        """Uniform element of the order-(p-1) subgroup mod ``p^(s+1)`` (the n^s-th residues)."""
        if not self.factors:
            # Teichmueller lift: y -> y^(p^s) is a bijection of Z_p^* onto that subgroup.
            return gmpy2.powmod(_rand_range(1, self.p), self.pows[-2], self.mod)
        table = self._table
        if table is None:
            with self._lock:
                if self._table is None:
                    root = _primitive_root(self.p, self.factors)
                    gen = gmpy2.powmod(root, self.pows[-2], self.mod)
                    self._table = FixedBase(gen, self.mod, int(self.p).bit_length())
                table = self._table
        return table.pow(_randbelow(self.p - 1))


@dataclass(frozen=True, kw_only=True, eq=False)
class PhePrivateKey:
    """A secret key: the factors of ``n`` (and the factorisations of ``p-1``, ``q-1``).

    Args:
        public: the matching public key.
        p, q: the primes (``n = pq``; ``p^2 q`` for Okamoto–Uchiyama).
        p_factors, q_factors: the distinct primes of ``p - 1`` and ``q - 1`` when known
            (keys made here); they certify the generators of the fast encryption path.
    """

    public: PhePublicKey
    p: Any = field(repr=False)
    q: Any = field(repr=False)
    p_factors: tuple[int, ...] = field(default=(), repr=False)
    q_factors: tuple[int, ...] = field(default=(), repr=False)
    _sides: list[_PrimeSide] = field(default_factory=list, init=False, repr=False)

    def __repr__(self) -> str:  # the factors are the secret: never print them
        return f"PhePrivateKey(scheme={self.public.scheme!r}, <secret>)"

    def __post_init__(self) -> None:
        pub = self.public
        if pub.scheme == OKAMOTO_UCHIYAMA:
            return
        self._sides.append(_PrimeSide(pub, mpz(self.p), self.p_factors))
        self._sides.append(_PrimeSide(pub, mpz(self.q), self.q_factors))

    @property
    def scheme(self) -> str:
        return self.public.scheme

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @functools.cached_property
    def _crt(self) -> tuple[Any, Any, Any]:
        """(mod_p, mod_q, inverse of mod_q mod mod_p) for CRT recombination of ciphertexts."""
        pub = self.public
        if pub.scheme == OKAMOTO_UCHIYAMA:
            mp, mq = mpz(self.p) ** 2, mpz(self.q)
        else:
            mp, mq = self._sides[0].mod, self._sides[1].mod
        return mp, mq, gmpy2.invert(mq, mp)

    @functools.cached_property
    def _ou(self) -> dict[str, Any]:
        pub = self.public
        p, q, n = mpz(self.p), mpz(self.q), mpz(pub.n)
        p2 = p * p
        lg = (gmpy2.powmod(pub.g, p - 1, p2) - 1) // p
        return {
            "p2": p2,
            "ginv": gmpy2.invert(lg, p),
            "g_p": FixedBase(pub.g, p2, pub.pbits),
            "h_p": FixedBase(pub.h, p2, pub.pbits),
            "g_q": FixedBase(pub.g, q, int(q).bit_length()),
            "h_q": FixedBase(pub.h, q, int(q).bit_length()),
            "n": n,
        }

    def _combine(self, cp: Any, cq: Any) -> Any:
        mp, mq, inv = self._crt
        return cq + mq * ((cp - cq) * inv % mp)

    def random_zero(self) -> Any:
        """A fresh encryption of 0, distributed exactly as :meth:`PhePublicKey.random_zero`."""
        if self.public.scheme == OKAMOTO_UCHIYAMA:
            o = self._ou
            r = _randbelow(o["n"])  # reduced per side: same law as h^r mod n
            return self._combine(o["h_p"].pow(r % (self.p - 1)), o["h_q"].pow(r % (self.q - 1)))
        return self._combine(self._sides[0].zero(), self._sides[1].zero())

    def g_pow(self, m: Any) -> Any:
        """The plaintext part ``g^m`` (OU: by the CRT with fixed-base tables)."""
        pub = self.public
        if pub.scheme == OKAMOTO_UCHIYAMA:
            o = self._ou
            m = mpz(m) % self.p
            return self._combine(o["g_p"].pow(m), o["g_q"].pow(m % (self.q - 1)))
        return pub.g_pow(m)

    def encrypt(self, m: Any) -> Any:
        """Encrypt with the CRT fast path (exactly the textbook ciphertext distribution)."""
        return self.g_pow(m) * self.random_zero() % self.public.modulus

    def decrypt(self, c: Any) -> Any:
        """Decrypt to the residue in ``[0, n^s)`` (OU: ``[0, p)``) with the CRT."""
        return self.decrypt_many([c])[0]

    def decrypt_many(self, cs: Sequence[Any]) -> list[Any]:
        """Decrypt many ciphertexts; the two prime sides run in parallel threads.

        ``gmpy2.powmod_base_list`` releases the GIL, so the ``p`` and ``q`` exponentiations
        of a large batch use two cores.
        """
        pub = self.public
        if not cs:
            return []
        if pub.scheme == OKAMOTO_UCHIYAMA:
            o = self._ou
            p, p2 = mpz(self.p), o["p2"]
            xs = gmpy2.powmod_base_list([mpz(c) % p2 for c in cs], p - 1, p2)
            return [(x - 1) // p * o["ginv"] % p for x in xs]
        sp, sq = self._sides
        out: list[Any] = [None, None]

        def side(i: int, sd: _PrimeSide) -> None:
            out[i] = gmpy2.powmod_base_list([mpz(c) % sd.mod for c in cs], sd.p - 1, sd.mod)

        if len(cs) >= 8:
            t = threading.Thread(target=side, args=(1, sq))
            t.start()
            side(0, sp)
            t.join()
        else:
            side(0, sp)
            side(1, sq)
        ps, qs = sp.pows[-2], sq.pows[-2]  # p^s, q^s
        inv = gmpy2.invert(qs, ps)
        res = []
        for xp, xq in zip(out[0], out[1]):
            mp, mq = sp.decrypt_pow(xp), sq.decrypt_pow(xq)
            res.append(mq + qs * ((mp - mq) * inv % ps))
        return res

    # ------------------------------------------------------------------- key files
    def key_file(self) -> KeyFile:
        """The private key file contents (public material + primes + factorisations)."""
        pub = self.public
        material = dict(pub._material())
        material.update(
            p=_hex(self.p),
            q=_hex(self.q),
            p_factors=[_hex(f) for f in self.p_factors],
            q_factors=[_hex(f) for f in self.q_factors],
        )
        return KeyFile(
            kind="private",
            scheme=pub.scheme,
            key_id=pub.key_id,
            params=pub._params(),
            material=material,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key file, mode 0600."""
        save_key_file(path, self.key_file())

    @classmethod
    def from_key_file(cls, kf: KeyFile, *, source: str = "key file") -> PhePrivateKey:
        """Build and check a private key (primes multiply to ``n``, factorisations hold).

        Raises:
            PublicKeyOnlyError: the file is a public key.
            KeyFileError: malformed or inconsistent material.
        """
        if kf.kind != "private":
            raise PublicKeyOnlyError(f"{source} holds a public key; the private key is needed")
        pub = PhePublicKey.from_key_file(kf, source=source)
        m = kf.material
        p = _parse_hex(m.get("p"), "p", MAX_BITS)
        q = _parse_hex(m.get("q"), "q", MAX_BITS)
        n = mpz(pub.n)
        product = p * p * q if pub.scheme == OKAMOTO_UCHIYAMA else p * q
        if product != n or p == q:
            raise KeyFileError(f"{source}: p and q do not factor n")
        if not gmpy2.is_prime(p, 32) or not gmpy2.is_prime(q, 32):
            raise KeyFileError(f"{source}: p or q is not prime")
        if pub.scheme == OKAMOTO_UCHIYAMA:
            if int(p).bit_length() != pub.pbits:
                raise KeyFileError(f"{source}: p is not {pub.pbits} bits")
            if gmpy2.powmod(pub.g, p - 1, p * p) == 1:
                raise KeyFileError(f"{source}: g has no order-p part mod p^2")
        elif gmpy2.gcd(n, (p - 1) * (q - 1)) != 1:
            raise KeyFileError(f"{source}: gcd(n, phi(n)) != 1")
        facs = []
        for name, prime in (("p_factors", p), ("q_factors", q)):
            raw = m.get(name, [])
            if not isinstance(raw, list) or len(raw) > 64:
                raise KeyFileError(f"{source}: {name} must be a list of hex strings")
            fs = tuple(int(_parse_hex(x, name, MAX_BITS)) for x in raw)
            if fs:
                _check_factors(prime, fs)
            facs.append(fs)
        return cls(public=pub, p=p, q=q, p_factors=facs[0], q_factors=facs[1])


def generate_private_key(
    scheme: str = PAILLIER,
    *,
    bits: int = DEFAULT_BITS,
    s: int | None = None,
    dim: int,
    precision: int | None = None,
    mask_bits: int = DEFAULT_MASK_BITS,
    model: str = "Dlib",
    metric: str = "cosine",
) -> PhePrivateKey:
    """Generate a key pair from the CSPRNG.

    Args:
        scheme: ``"paillier"`` (default), ``"damgard-jurik"`` or ``"okamoto-uchiyama"``.
        bits: exact size of ``n``: 2048, 3072 (128-bit security, the default), 7680 or
            15360 (the sizes of :data:`SECURITY_BITS`).
        s: Damgård–Jurik's exponent (default 2; 1 at 15360 bits), at most 4 with
            ``s * bits <= 15360``; must be 1/None for the others.
        dim: embedding dimension.
        precision: fixed-point bits; :func:`default_precision` of ``dim`` by default.
        mask_bits: statistical hiding of masked slots (>= 32; default 40).
        model, metric: recorded in the key files.

    Returns:
        The private key (``.public`` is the public key).

    Raises:
        InsecureParametersError: ``bits < 2048`` or ``mask_bits < 32``.
        InvalidArgumentError: unknown scheme or bad parameters.
    """
    if scheme not in SCHEMES:
        raise InvalidArgumentError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if scheme == OKAMOTO_UCHIYAMA:
        warn_legacy_ou()
    _check_bits(bits)
    if not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise InvalidArgumentError(f"dim must be an int in 1..{MAX_DIM}, not {dim!r}")
    if mask_bits < MIN_MASK_BITS:
        raise InsecureParametersError(f"mask_bits={mask_bits} is below {MIN_MASK_BITS}")
    if scheme == DAMGARD_JURIK:
        # The default s shrinks where s*bits would pass the cap (s=1 at 15360 bits).
        s = _check_dj_s(min(DEFAULT_DJ_S, MAX_DJ_BITS // bits) if s is None else s, bits)
    elif s not in (None, 1):
        raise InvalidArgumentError(f"s is a Damgard-Jurik parameter; {scheme} has s=1")
    else:
        s = 1
    prec = default_precision(dim) if precision is None else precision
    if not isinstance(prec, int) or not 8 <= prec <= 30:
        raise InvalidArgumentError(f"precision must be in 8..30 bits, not {prec!r}")
    extra: dict[str, Any] = {}
    if scheme == OKAMOTO_UCHIYAMA:
        kp = (bits + 2) // 3
        while True:
            p = _random_prime(3 * (mpz(1) << (kp - 2)), mpz(1) << kp)
            p2 = p * p
            lo = ((mpz(1) << (bits - 1)) + p2 - 1) // p2
            hi = ((mpz(1) << bits) - 1) // p2 + 1
            q = _random_prime(lo, hi)
            n = p2 * q
            if q != p and n.bit_length() == bits:
                break
        while True:
            g = _rand_range(2, n - 1)
            if gmpy2.gcd(g, n) == 1 and gmpy2.powmod(g, p - 1, p2) != 1:
                break
        extra = {"g": g, "h": gmpy2.powmod(g, n, n), "pbits": kp}
        pf: list[int] = []
        qf: list[int] = []
    else:
        if bits % 2:
            raise InvalidArgumentError(f"{scheme} needs an even modulus size, not {bits}")
        k = bits // 2
        lo, hi = 3 * (mpz(1) << (k - 2)), mpz(1) << k
        while True:
            p, pf = _structured_prime(lo, hi)
            q, qf = _structured_prime(lo, hi)
            n = p * q
            if p != q and n.bit_length() == bits and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
                break
    pub = PhePublicKey(
        scheme=scheme,
        n=n,
        bits=bits,
        s=s,
        dim=dim,
        precision=prec,
        mask_bits=mask_bits,
        model=model,
        metric=metric,
        **extra,
    )
    Packing.for_key(pub)  # fails early if nothing fits
    return PhePrivateKey(public=pub, p=p, q=q, p_factors=tuple(pf), q_factors=tuple(qf))


def load_key(
    path: str | os.PathLike[str], *, scheme: str | None = None
) -> PhePublicKey | PhePrivateKey:
    """Load a Paillier-family key file (private -> :class:`PhePrivateKey`).

    Raises:
        KeyFileError: missing, malformed, or not a Paillier-family key (of ``scheme``).
        InsecureParametersError: a modulus below 2048 bits.
    """
    kf = load_key_file(path, expect_scheme=scheme)
    if kf.scheme not in SCHEMES:
        raise KeyFileError(f"{path} holds a {kf.scheme} key, not a Paillier-family one")
    if kf.kind == "private":
        return PhePrivateKey.from_key_file(kf, source=str(path))
    return PhePublicKey.from_key_file(kf, source=str(path))


def public_key_from_bytes(data: bytes) -> PhePublicKey:
    """Parse public key bytes received from an edge (:meth:`PhePublicKey.to_bytes`).

    Everything wrong with them is the peer's fault: a short key (below 2048 bits), an
    unsupported size (not one of :data:`KEY_SIZES`), a Damgård–Jurik ``s`` over the
    caps, or a malformed file all raise :class:`KeyMismatchError` -- before any table
    is built or any large object decoded.

    Raises:
        KeyMismatchError: not a well-formed, supported Paillier-family public key.
        PayloadTooLargeError: more than :data:`MAX_PUBLIC_KEY_BYTES`.
    """
    data = bytes(data)
    if len(data) > MAX_PUBLIC_KEY_BYTES:
        raise PayloadTooLargeError(
            f"received public key is {len(data)} bytes (> {MAX_PUBLIC_KEY_BYTES})"
        )
    try:
        if data.startswith(MAGIC):
            # A public key file is three small maps of short hex strings: decode it with
            # tight limits first (parse_key_bytes has to read whole private key files).
            unpack_bounded(
                data[len(MAGIC) :],
                max_containers=8,
                max_array_len=64,
                max_str_len=MAX_BITS // 4 + 64,
            )
    except Exception as exc:  # msgpack raises several unrelated types
        raise KeyMismatchError(f"received public key is corrupt: {exc}") from exc
    try:
        kf = parse_key_bytes(data, source="received public key")
        if kf.kind != "public":
            raise KeyFileError("received key bytes do not hold a public key")
        return PhePublicKey.from_key_file(kf, source="received public key")
    except LocalError as exc:  # KeyFileError, InsecureParametersError...: the peer's fault
        raise KeyMismatchError(str(exc)) from exc


# -------------------------------------------------------------------- rerandomising
class Rerandomizer:
    """Fresh encryptions of zero with the public key only, for rerandomising results.

    ``table=False``: textbook ``r^(n^s)`` / ``h^r`` with ``r`` uniform (one full
    exponentiation each; ~11 ms at 2048 bits, ~35 ms at 3072 for Paillier).

    ``table=True`` (many results, the cloud's 1:N): the Damgård–Jurik–Nielsen
    variant. A secret base ``x`` uniform in ``Z_n^*`` is drawn once per instance and
    ``z = (x^(n^s))^a`` with ``a`` uniform below ``2^(bits/2)`` is computed from a
    fixed-base table (~bits/16 multiplications up to 3072 bits; the window narrows for
    larger keys so the table stays under :data:`TABLE_BYTES`). ``z`` is ``r^(n^s)`` for ``r = x^a``;
    Håstad, Schrift and Shamir showed that exponentiation modulo a composite with
    half-length exponents is indistinguishable from full-length ones if factoring is
    hard, which is the argument DJN give for the same optimisation. Okamoto–Uchiyama
    uses ``h^a`` the same way. The factor only has to hide the result's randomness from
    eavesdroppers (the key holder learns nothing about plaintexts from randomness).
    """

    def __init__(self, pub: PhePublicKey, *, table: bool) -> None:
        self.pub = pub
        self._table: FixedBase | None = None
        if table:
            n = mpz(pub.n)
            if pub.scheme == OKAMOTO_UCHIYAMA:
                base = mpz(pub.h)
            else:
                while True:
                    x = _randbelow(n)
                    if x > 1 and gmpy2.gcd(x, n) == 1:
                        break
                base = gmpy2.powmod(x, n**pub.s, pub.modulus)
            self._exp_bits = pub.bits // 2
            self._table = FixedBase(base, pub.modulus, self._exp_bits)

    def zero(self) -> Any:
        """A fresh encryption of 0."""
        if self._table is None:
            return self.pub.random_zero()
        return self._table.pow(mpz(secrets.randbits(self._exp_bits)))


# ------------------------------------------------------------------------ encoding
@dataclass(frozen=True, kw_only=True)
class Packing:
    """Fixed-point encoding and slot layout of one key.

    Templates and probes are L2-normalised, then rounded to ``f`` fractional bits:
    ``T = round(t 2^f)``, ``|T| <= 2^f``. A score slot holds ``v = <T, P> + 2^(2f+1)``:
    by Cauchy-Schwarz ``|<T, P>| <= (2^f + sqrt(d)/2)^2 < 2^(2f+1)``, so ``0 < v <
    2^(2f+2)`` (``value_bits = 2f + 2``) and signs never show in clear. A slot is
    ``w = value_bits + mask_bits + 1`` bits wide: the cloud can add a uniform mask below
    ``2^w - 2^value_bits`` to a slot without a carry into the next one, which hides its
    value within statistical distance ``2^-mask_bits``. ``slots = plaintext_bits // w``.

    Args:
        dim: embedding dimension.
        precision: ``f``.
        mask_bits: statistical hiding of masked slots.
        slot_bits: ``w``.
        slots: slots per ciphertext.
    """

    dim: int
    precision: int
    mask_bits: int
    slot_bits: int
    slots: int

    @classmethod
    def for_key(cls, pub: PhePublicKey) -> Packing:
        """The packing of a key (deterministic: edge and cloud derive the same one).

        Raises:
            InvalidArgumentError: not even one slot fits the plaintext space.
        """
        f = pub.precision
        w = 2 * f + 2 + pub.mask_bits + 1
        k = pub.plaintext_bits // w
        if k < 1:
            raise InvalidArgumentError(f"a {w}-bit slot does not fit {pub.scheme} plaintexts")
        return cls(dim=pub.dim, precision=f, mask_bits=pub.mask_bits, slot_bits=w, slots=k)

    @property
    def value_bits(self) -> int:
        return 2 * self.precision + 2

    @property
    def offset(self) -> int:
        """Added to every score so that slots never hold negative values."""
        return 1 << (2 * self.precision + 1)

    @property
    def unit(self) -> int:
        """Integer value of an element of 1.0 (``2^f``)."""
        return 1 << self.precision

    @property
    def norm_limit(self) -> int:
        """Largest squared norm of an honestly rounded unit vector: ``(2^f + sqrt(d)/2)^2``."""
        return (self.unit + math.isqrt(self.dim) // 2 + 1) ** 2

    @property
    def mask_limit(self) -> int:
        """Masks are uniform in ``[0, mask_limit)``: ``v + mask < 2^w`` always."""
        return (1 << self.slot_bits) - (1 << self.value_bits) + 1

    def to_dict(self) -> dict[str, int]:
        """The parameters carried in payloads (both sides check they agree)."""
        return {
            "dim": self.dim,
            "precision": self.precision,
            "mask_bits": self.mask_bits,
            "slot_bits": self.slot_bits,
            "slots": self.slots,
        }

    def normalise(self, vectors: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Check shape and finiteness and L2-normalise rows: ``(n, dim)`` float64.

        Raises:
            InvalidArgumentError: wrong shape, non-finite values or a zero vector.
        """
        from cipherface.crypto.engine import normalise_embeddings

        return normalise_embeddings(vectors, self.dim)

    def quantise(self, vectors: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Normalise and round to ``f`` fractional bits: int64 ``(n, dim)`` in ``[-2^f, 2^f]``."""
        x = self.normalise(vectors)
        q = np.rint(x * float(self.unit)).astype(np.int64)
        return np.asarray(np.clip(q, -self.unit, self.unit), dtype=np.int64)

    def check_probe(self, probe: npt.NDArray[np.int64]) -> bool:
        """True when a received fixed-point probe is a rounded unit vector of this dim."""
        if probe.shape != (self.dim,) or np.abs(probe).max(initial=0) > self.unit:
            return False
        return sum(int(v) * int(v) for v in probe.tolist()) <= self.norm_limit

    def decode(self, v: int) -> float:
        """Score of a slot value; NaN when out of the honest range (masked slots)."""
        sv = v - self.offset
        if abs(sv) > self.norm_limit:
            return math.nan
        return sv / float(1 << (2 * self.precision))

    def unpack(self, m: int) -> list[int]:
        """Split a decrypted plaintext into its slot values (slot 0 = lowest bits)."""
        w, mask = self.slot_bits, (1 << self.slot_bits) - 1
        return [(m >> (i * w)) & mask for i in range(self.slots)]


def save_keys(
    key: PhePrivateKey,
    private_path: str | os.PathLike[str] | None = None,
    public_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write a private key file (0600) and/or its public key file (0644)."""
    if private_path is not None:
        key.save(Path(private_path))
    if public_path is not None:
        key.public.save(Path(public_path))
