"""The CKKS gallery engine: keys, edge encryption, cloud gallery, result checks.

Layout (docs/crypto.md has the full argument and the byte formats):

* **Column blocks** for 1:N. A block holds ``N`` templates (4096). Ciphertext ``j``
  of the block encrypts the polynomial whose coefficient ``k`` is feature ``j`` of
  template ``k``. An identify probe is ``d`` ciphertexts of *constant* polynomials
  ``p_j``; ``sum_j block_j * probe_j`` puts the score of template ``k`` in
  coefficient ``k``: ``d`` products per 4096 scores and no rotation.
* **Packed templates** for 1:1. ``N // d`` templates sit side by side in one
  ciphertext; a verify probe is one ciphertext holding the probe *reversed*
  (``p_0 - sum p_i X^(N-i)``), so coefficient ``offset`` of the product is that
  template's score. The cloud extracts just that coefficient as an LWE sample
  (32 KB), so the edge learns one score and nothing about the other templates.

The cloud adds flooding noise before rescaling, replaces free and deleted slots'
results with uniform randomness, and erases a deleted template by adding uniform
randomness to its coefficients (a one-time pad under encryption).
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numba
import numpy as np
import numpy.typing as npt

from cipherface.crypto import rlwe
from cipherface.crypto.engine import FloatArray, ProbeOp
from cipherface.crypto.keyfile import (
    KeyFile,
    fingerprint,
    key_file_bytes,
    load_key_file,
    parse_key_bytes,
    save_key_file,
)
from cipherface.crypto.store import GalleryStore
from cipherface.crypto.wire import unpack_bounded
from cipherface.errors import (
    DecodeError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    PublicKeyOnlyError,
    ResultRejectedError,
    UnknownIdentityError,
)

SCHEME = "ckks"
FORMAT = "cf-ckks/1"
FLOOD_BITS = 40  # smudging: std ~6x the product noise (2^36.7); error <= 2^40/2^58 = 4e-6

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]


# ------------------------------------------------------------------ encoding
def _normalise(vectors: npt.ArrayLike, dim: int) -> npt.NDArray[np.float64]:
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] != dim:
        raise InvalidArgumentError(f"expected embeddings of dimension {dim}, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise InvalidArgumentError("embedding contains NaN or infinity")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise InvalidArgumentError("cannot normalise an all-zero embedding")
    return cast(npt.NDArray[np.float64], v / norms)


def _fixed(x: npt.NDArray[np.float64], params: rlwe.Params) -> npt.NDArray[np.int64]:
    return np.rint(x * params.delta).astype(np.int64)


def _pack32(a: U64) -> bytes:
    return np.ascontiguousarray(a, dtype="<u4").tobytes()


def _unpack32(b: object, shape: tuple[int, ...], what: str, q: U64 | None = None) -> U64:
    if not isinstance(b, bytes):
        raise DecodeError(f"{what}: expected bytes")
    need = int(np.prod(shape)) * 4
    if len(b) != need:
        raise DecodeError(f"{what}: {len(b)} bytes, expected {need}")
    arr = np.frombuffer(b, dtype="<u4").astype(np.uint64).reshape(shape)
    if q is not None and np.any(arr >= q.reshape((1,) * (len(shape) - 2) + (-1, 1))):
        raise DecodeError(f"{what}: residue out of range")
    return arr


def _check_dim(dim: int, params: rlwe.Params) -> None:
    # Packing needs N // dim templates per ciphertext with no remainder (all deepface
    # models have power-of-two dimensions).
    if not 1 <= dim <= params.n or params.n % dim:
        raise InvalidArgumentError(
            f"dimension {dim} must divide N={params.n} (128, 512, 4096 ... are fine)"
        )


# ---------------------------------------------------------------------- keys
@dataclass(frozen=True, kw_only=True, eq=False)
class CkksPublic:
    """What the cloud holds: parameters, embedding geometry and the public key."""

    params: rlwe.Params
    pk: rlwe.PublicKey
    dim: int
    model: str
    metric: str

    @functools.cached_property
    def key_id(self) -> str:
        # dim, model and metric are bound too: changing them must change the key id.
        return fingerprint(
            msgpack.packb(self.params.to_dict()),
            _pack32(self.pk.b),
            self.pk.seed,
            msgpack.packb([self.dim, self.model, self.metric]),
        )

    def key_file(self) -> KeyFile:
        return KeyFile(
            kind="public",
            scheme=SCHEME,
            key_id=self.key_id,
            params={
                **self.params.to_dict(),
                "dim": self.dim,
                "model": self.model,
                "metric": self.metric,
            },
            material={"b": _pack32(self.pk.b), "seed": self.pk.seed},
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class CkksKeys:
    """A site's CKKS key pair (edge) or public part only (cloud: ``sk is None``)."""

    public: CkksPublic
    sk: rlwe.SecretKey | None

    @classmethod
    def generate(
        cls, *, dim: int, model: str = "Dlib", metric: str = "cosine", security_level: int = 128
    ) -> CkksKeys:
        """Generate a key pair.

        Args:
            dim: embedding dimension (<= N).
            model: face model name, recorded so both sides agree on thresholds.
            metric: ``"cosine"`` or ``"euclidean"``.
            security_level: 128, 192 or 256.

        Raises:
            InvalidArgumentError: unsupported level or dimension.
        """
        params = rlwe.preset(security_level)
        _check_dim(dim, params)
        sk = rlwe.SecretKey.generate(params)
        pk = rlwe.PublicKey.generate(sk)
        return cls(
            public=CkksPublic(params=params, pk=pk, dim=dim, model=model, metric=metric), sk=sk
        )

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def require_secret(self) -> rlwe.SecretKey:
        if self.sk is None:
            raise PublicKeyOnlyError(
                "this key holds only the public part: decrypting needs the private key "
                "file (export_private_key / keys/private.key on the edge)"
            )
        return self.sk

    def save_private(self, path: str | os.PathLike[str]) -> None:
        sk = self.require_secret()
        pub = self.public.key_file()
        save_key_file(
            path,
            KeyFile(
                kind="private",
                scheme=SCHEME,
                key_id=pub.key_id,
                params=pub.params,
                material={**pub.material, "s": sk.s.astype(np.int8).tobytes()},
            ),
        )

    def save_public(self, path: str | os.PathLike[str]) -> None:
        save_key_file(path, self.public.key_file())

    @classmethod
    def from_key_file(cls, kf: KeyFile, *, source: str = "key file") -> CkksKeys:
        """Rebuild keys from a decoded key file, checking every field.

        Raises:
            KeyFileError: not a CKKS key or malformed.
        """
        if kf.scheme != SCHEME:
            raise KeyFileError(f"{source} holds a {kf.scheme} key, not {SCHEME}")
        try:
            params = rlwe.Params.from_dict(kf.params)
            dim = kf.params["dim"]
            if not isinstance(dim, int) or isinstance(dim, bool):
                raise KeyFileError(f"{source}: dim must be an int")
            _check_dim(dim, params)
            model = kf.params.get("model", "Dlib")
            metric = kf.params.get("metric", "cosine")
            if not isinstance(model, str) or metric not in ("cosine", "euclidean"):
                raise KeyFileError(f"{source}: bad model or metric")
            b = _unpack32(
                kf.material["b"],
                (len(params.primes), params.n),
                "public key",
                np.array(params.primes, dtype=np.uint64),
            )
            seed = kf.material["seed"]
            if not isinstance(seed, bytes) or len(seed) != rlwe.SEED_BYTES:
                raise KeyFileError(f"{source}: bad public key seed")
        except (KeyError, TypeError, ValueError, DecodeError, InvalidArgumentError) as exc:
            raise KeyFileError(f"{source} is malformed: {exc}") from exc
        public = CkksPublic(
            params=params,
            pk=rlwe.PublicKey(params=params, b=b, seed=seed),
            dim=dim,
            model=model,
            metric=metric,
        )
        if public.key_id != kf.key_id:
            raise KeyFileError(f"{source}: key id does not match the key material (tampered?)")
        sk = None
        if kf.kind == "private":
            raw = kf.material.get("s")
            if not isinstance(raw, bytes) or len(raw) != params.n:
                raise KeyFileError(f"{source}: secret key missing or malformed")
            sk = rlwe.SecretKey.from_coeffs(params, np.frombuffer(raw, dtype=np.int8))
            # The public key must belong to this secret: b + a*s must be small.
            r = rlwe.ring_for(params)
            e = r.from_rns(r.intt((b + r.mul(public.pk.a, sk.s_ntt)) % r.qcol))
            if np.abs(e).max() > 64:
                raise KeyFileError(f"{source}: public and secret key do not match")
        return cls(public=public, sk=sk)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CkksKeys:
        """Load a private or public CKKS key file.

        Raises:
            KeyFileError: missing, malformed, wrong scheme.
        """
        return cls.from_key_file(load_key_file(path, expect_scheme=SCHEME), source=str(path))

    @classmethod
    def from_public_bytes(cls, data: bytes) -> CkksKeys:
        """Parse public key material received from an edge (the ``key.publish`` body).

        Raises:
            KeyMismatchError: the bytes are not a valid public CKKS key file.
        """
        try:
            kf = parse_key_bytes(data, source="received public key")
            if kf.kind != "public":
                raise KeyFileError("received key bytes do not hold a public key")
            return cls.from_key_file(kf, source="received public key")
        except KeyFileError as exc:
            raise KeyMismatchError(str(exc)) from exc

    def public_key_bytes(self) -> bytes:
        return key_file_bytes(self.public.key_file())


# ---------------------------------------------------------------- wire helpers
def _header(pub: CkksPublic, kind: str) -> dict[str, Any]:
    return {"f": FORMAT, "kind": kind, "kid": pub.key_id, "n": pub.params.n, "dim": pub.dim}


def _decode(data: bytes, pub: CkksPublic, kind: str, err: type[Exception]) -> dict[str, Any]:
    try:
        # One map, plus one list of blocks in an identify result: nothing else to build.
        obj = unpack_bounded(data, max_containers=2, max_array_len=rlwe.MAX_BLOCKS, max_str_len=64)
    except Exception as exc:
        raise err(f"{kind}: not a msgpack CKKS object ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("f") != FORMAT:
        raise err(f"{kind}: not a {FORMAT} object")
    if obj.get("kind") != kind:
        raise err(f"expected a {kind}, got {obj.get('kind')!r}")
    if obj.get("kid") != pub.key_id:
        # On the edge a result for another key is a rejected result; in the cloud a
        # payload for another key is a key mismatch the requester must hear about.
        raise (ResultRejectedError if err is ResultRejectedError else KeyMismatchError)(
            f"{kind} was made for key {obj.get('kid')!r}, this site's key is {pub.key_id}"
        )
    if obj.get("n") != pub.params.n or obj.get("dim") != pub.dim:
        raise err(f"{kind}: parameters (n, dim) differ from this key's")
    return obj


def finish_product(ring: rlwe.Ring, prod: U64) -> U64:
    """Size-3 NTT product ``(3, k, N)`` -> flooded, rescaled coefficient form ``(3, 1, N)``.

    The flooding noise (uniform, ``FLOOD_BITS`` bits) hides the template-dependent
    part of the product's noise from the key holder (circuit privacy) and costs
    under 1e-6 of precision.
    """
    coeff = ring.intt(prod)
    flood = np.frombuffer(secrets.token_bytes(8 * ring.n), dtype="<i8") >> (63 - FLOOD_BITS)
    coeff[0] = (coeff[0] + ring.to_rns(flood)) % ring.qcol
    return ring.rescale(coeff)


def lwe_result(pub: CkksPublic, x: U64, y: U64, offset: int) -> bytes:
    """Multiply two size-2 NTT ciphertexts and return coefficient ``offset`` of the
    product as a rescaled LWE sample (``result-verify``): the key holder learns that
    one coefficient and nothing of the others."""
    r = rlwe.ring_for(pub.params)
    prod = np.stack(
        [r.mul(x[0], y[0]), (r.mul(x[0], y[1]) + r.mul(x[1], y[0])) % r.qcol, r.mul(x[1], y[1])]
    )
    res = _shift_down(finish_product(r, prod), offset, int(r.q[0]))
    return cast(
        bytes,
        msgpack.packb(
            {
                **_header(pub, "result-verify"),
                "count": 1,
                "b": int(res[0, 0, 0]),
                "a": _pack32(res[1:]),
            },
            use_bin_type=True,
        ),
    )


def lwe_results(pub: CkksPublic, xs: U64, ys: U64, offsets: Sequence[int]) -> list[bytes]:
    """:func:`lwe_result` for a batch: ``xs``, ``ys`` are ``(B, 2, k, N)``.

    One inverse NTT over the whole batch instead of one per verify (the per-call cost
    of the parallel kernel dominates a single verify); each sample gets its own
    flooding noise, so a result is distributed exactly as :func:`lwe_result`'s."""
    r = rlwe.ring_for(pub.params)
    x0, x1, y0, y1 = xs[:, 0], xs[:, 1], ys[:, 0], ys[:, 1]
    prod = np.stack([r.mul(x0, y0), (r.mul(x0, y1) + r.mul(x1, y0)) % r.qcol, r.mul(x1, y1)], 1)
    coeff = r.intt(prod)  # (B, 3, k, N)
    flood = np.frombuffer(secrets.token_bytes(8 * r.n * len(offsets)), dtype="<i8")
    flood = (flood >> (63 - FLOOD_BITS)).reshape(len(offsets), r.n)
    coeff[:, 0] = (coeff[:, 0] + r.to_rns(flood)) % r.qcol
    res = r.rescale(coeff)  # (B, 3, 1, N)
    out = []
    for i, offset in enumerate(offsets):
        one = _shift_down(res[i], offset, int(r.q[0]))
        body = {**_header(pub, "result-verify"), "count": 1, "b": int(one[0, 0, 0])}
        body["a"] = _pack32(one[1:])
        out.append(cast(bytes, msgpack.packb(body, use_bin_type=True)))
    return out


def encode_forward(fx: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    """Template layout: coefficient ``i`` holds feature ``i``."""
    out = np.zeros(n, dtype=np.int64)
    out[: fx.shape[0]] = fx
    return out


def encode_reversed(fx: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    """Probe layout ``p_0 - sum_i p_i X^(N-i)``: coefficient 0 of template x probe is the dot."""
    out = np.zeros(n, dtype=np.int64)
    out[0] = fx[0]
    out[n - np.arange(1, fx.shape[0])] = -fx[1:]
    return out


# ---------------------------------------------------------------- edge side
class CkksEdgeCipher:
    """Edge half of the CKKS engine (holds the secret key).

    Args:
        keys: the site's key pair (:meth:`CkksKeys.generate` / :meth:`CkksKeys.load`).
    """

    scheme = SCHEME

    def __init__(self, *, keys: CkksKeys) -> None:
        self.keys = keys
        self.pub = keys.public
        self.params = keys.public.params
        self.ring = rlwe.ring_for(self.params)
        self.dim = keys.public.dim
        self.key_id = keys.key_id
        self.per_pack = self.params.n // self.dim
        self.model = keys.public.model
        self.metric = keys.public.metric
        self.max_templates_per_payload = self.params.n  # one block per payload
        self._lwe_cache: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None

    def public_key_bytes(self) -> bytes:
        return self.keys.public_key_bytes()

    # -------------------------------------------------------------- encrypt
    def _seal(self, m_ntt: U64) -> tuple[bytes, bytes]:
        c0, seed = rlwe.encrypt_symmetric(self.keys.require_secret(), m_ntt)
        return _pack32(c0), seed

    def encrypt_templates(self, vectors: npt.ArrayLike) -> bytes:
        """Encrypt 1..N L2-normalised templates as one enrollment payload.

        Returns:
            msgpack bytes: ``d`` column ciphertexts and ``ceil(n / (N//d))`` packed ones.

        Raises:
            InvalidArgumentError: wrong dimension, zero vector, or more than N templates.
        """
        v = _normalise(vectors, self.dim)
        n, d, N = v.shape[0], self.dim, self.params.n
        if n > N:
            raise InvalidArgumentError(f"at most {N} templates per payload, got {n}")
        fx = _fixed(v, self.params)  # (n, d)
        r = self.ring
        # Column j: coefficient k = feature j of template k.
        col = np.zeros((d, N), dtype=np.int64)
        col[:, :n] = fx.T
        col_ntt = r.ntt(r.to_rns(col))
        # Packed: template i at ciphertext i // per, coefficients (i % per) * d ...
        npack = -(-n // self.per_pack)
        pack = np.zeros((npack, N), dtype=np.int64)
        for i in range(n):
            off = (i % self.per_pack) * d
            pack[i // self.per_pack, off : off + d] = fx[i]
        pack_ntt = r.ntt(r.to_rns(pack))
        c0c, sc = self._seal(col_ntt)
        c0p, sp = self._seal(pack_ntt)
        return cast(
            bytes,
            msgpack.packb(
                {
                    **_header(self.pub, "templates"),
                    "count": n,
                    "col": c0c,
                    "col_seed": sc,
                    "pack": c0p,
                    "pack_seed": sp,
                },
                use_bin_type=True,
            ),
        )

    def encrypt_probe(self, vector: npt.ArrayLike, *, op: ProbeOp) -> bytes:
        """Encrypt one probe: ``verify`` -> one reversed ciphertext (32 KB); ``identify``
        -> ``d`` constant ciphertexts (``d`` x 32 KB).

        Raises:
            InvalidArgumentError: wrong dimension or op.
        """
        fx = _fixed(_normalise(vector, self.dim), self.params)[0]
        r, N = self.ring, self.params.n
        if op == "verify":
            c0, seed = self._seal(r.ntt(r.to_rns(encode_reversed(fx, N)))[None])
            kind = "probe-verify"
        elif op == "identify":
            # NTT of a constant polynomial is that constant in every position.
            m = np.broadcast_to(r.to_rns(fx[:, None])[..., :1], (self.dim, r.k, N))
            c0, seed = self._seal(np.ascontiguousarray(m))
            kind = "probe-identify"
        else:
            raise InvalidArgumentError(f"op must be 'verify' or 'identify', not {op!r}")
        return cast(
            bytes,
            msgpack.packb({**_header(self.pub, kind), "c0": c0, "seed": seed}, use_bin_type=True),
        )

    # -------------------------------------------------------------- decrypt
    def _lwe_secret(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if self._lwe_cache is None:
            sk = self.keys.require_secret()
            r = self.ring
            s2 = r.from_rns(r.intt(sk.s2_ntt[:1]))
            q0 = int(r.q[0])

            # Coefficient 0 of c*s is c[0]s[0] - sum_{i>0} c[i] s[N-i]: pre-arrange s.
            def arrange(x: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
                out = np.empty_like(x)
                out[0] = x[0]
                out[1:] = -x[:0:-1]
                return np.mod(out, q0)

            self._lwe_cache = (arrange(sk.s), arrange(s2))
        return self._lwe_cache

    def _decrypt_lwe(self, b: int, a: npt.NDArray[np.int64]) -> int:
        s1, s2 = self._lwe_secret()
        q = int(self.ring.q[0])
        m = (b + int(((a[0] * s1) % q).sum()) + int(((a[1] * s2) % q).sum())) % q
        return m - q if m > q // 2 else m

    def decrypt_scores(self, result: bytes, *, op: ProbeOp, count: int) -> FloatArray:
        """Check and decrypt a result: similarities (cosine, in [-1, 1]).

        Args:
            result: the cloud's result bytes.
            op: the operation that was asked (``verify`` or ``identify``).
            count: how many scores were asked for (1 for verify; the gallery's slot count).

        Raises:
            ResultRejectedError: not a result for this key / op / count; never decrypted.
            PublicKeyOnlyError: no secret key here.
        """
        self.keys.require_secret()
        kind = "result-verify" if op == "verify" else "result-identify"
        obj = _decode(result, self.pub, kind, ResultRejectedError)
        N, q0 = self.params.n, self.ring.q[:1]
        scale = self.params.delta**2 / float(self.params.primes[1])
        if obj.get("count") != count:
            raise ResultRejectedError(f"{kind} carries {obj.get('count')!r} scores, {count} asked")
        try:
            if op == "verify":
                if count != 1:
                    raise ResultRejectedError("a verify result has exactly one score")
                b = obj["b"]
                if not isinstance(b, int) or not 0 <= b < int(q0[0]):
                    raise ResultRejectedError("verify result: bad b")
                a = _unpack32(obj["a"], (2, 1, N), "verify result", q0)[:, 0, :].astype(np.int64)
                return np.array([self._decrypt_lwe(b, a) / scale])
            blocks = obj["blocks"]
            if (
                not isinstance(blocks, list)
                or len(blocks) * N < count
                or (len(blocks) * N - count >= N)
            ):
                raise ResultRejectedError(
                    f"identify result has a wrong number of blocks for {count}"
                )
            if not blocks:
                return np.zeros(0, dtype=np.float64)
            c = np.stack([_unpack32(x, (3, 1, N), "identify result", q0) for x in blocks])
        except (DecodeError, KeyError, TypeError) as exc:
            raise ResultRejectedError(f"{kind} is malformed: {exc}") from exc
        sk = self.keys.require_secret()
        r = self.ring
        t = r.ntt(c[:, 1:])  # (B, 2, 1, N)
        acc = (r.mul(t[:, 0], sk.s_ntt[:1]) + r.mul(t[:, 1], sk.s2_ntt[:1])) % r.qcol[:1]
        m = r.from_rns((c[:, 0] + r.intt(acc)) % r.qcol[:1])  # (B, N)
        return (m.reshape(-1)[:count] / scale).astype(np.float64)


# --------------------------------------------------------------- cloud side
@numba.njit(cache=True, parallel=True, nogil=True)
def _mac_block(g: U32, p: U32, q: U64, out: U64) -> None:  # pragma: no cover - jit
    """out[c, r, s] = sum_j (g_j x p_j)[c] mod q_r for size-2 inputs -> size-3 output."""
    d, _, k, n = g.shape
    chunk = 256
    per_row = n // chunk
    for c in numba.prange(k * per_row):
        r = c // per_row
        s0 = (c % per_row) * chunk
        qr = q[r]
        a0 = np.zeros(chunk, dtype=np.uint64)
        a1 = np.zeros(chunk, dtype=np.uint64)
        a2 = np.zeros(chunk, dtype=np.uint64)
        for j in range(d):
            for t in range(chunk):
                g0 = np.uint64(g[j, 0, r, s0 + t])
                g1 = np.uint64(g[j, 1, r, s0 + t])
                p0 = np.uint64(p[j, 0, r, s0 + t])
                p1 = np.uint64(p[j, 1, r, s0 + t])
                a0[t] += g0 * p0
                a1[t] += g0 * p1 + g1 * p0
                a2[t] += g1 * p1
            if j % 4 == 3:  # products < 2^60: reduce before 16 of them could overflow
                for t in range(chunk):
                    a0[t] %= qr
                    a1[t] %= qr
                    a2[t] %= qr
        for t in range(chunk):
            out[0, r, s0 + t] = a0[t] % qr
            out[1, r, s0 + t] = a1[t] % qr
            out[2, r, s0 + t] = a2[t] % qr


class CkksGallery:
    """One site's encrypted CKKS gallery in the cloud (public key only).

    Args:
        path: gallery directory (created if missing).
        public: the site's public key (:meth:`CkksKeys.from_public_bytes` or ``.public``).

    Raises:
        GalleryError: the directory holds a gallery for another key.
        StorageCorruptError: a gallery file fails its integrity checks.
    """

    scheme = SCHEME

    def __init__(self, *, path: str | os.PathLike[str], public: CkksPublic) -> None:
        self.pub = public
        self.params = public.params
        self.ring = rlwe.ring_for(self.params)
        self.dim = public.dim
        self.key_id = public.key_id
        self.per_pack = self.params.n // self.dim
        self.npack = -(-self.params.n // self.per_pack)
        self.store = GalleryStore(
            path,
            meta={
                "scheme": SCHEME,
                "key_id": self.key_id,
                "dim": self.dim,
                "params": self.params.to_dict(),
            },
        )
        self._lock = threading.RLock()
        self._index: dict[str, int] = {
            ident: slot for slot, ident in enumerate(self.store.slots) if ident is not None
        }
        # Keyed by (name, version): a stale entry can never be served after a commit.
        self._cache: dict[tuple[str, int], npt.NDArray[np.uint32]] = {}

    # ------------------------------------------------------------ properties
    @property
    def count(self) -> int:
        return len(self._index)

    @property
    def ids_version(self) -> int:
        return self.store.ids_version

    def ids(self) -> list[str | None]:
        with self._lock:
            return self._ids_locked()

    def _live_blocks(self) -> list[int]:
        """Block numbers with files, in slot order (fully deleted blocks are gone)."""
        nblocks = -(-len(self.store.slots) // self.params.n)
        return [b for b in range(nblocks) if f"col-{b:06d}" in self.store.blocks]

    def _ids_locked(self) -> list[str | None]:
        N, out = self.params.n, []
        for b in self._live_blocks():
            block = self.store.slots[b * N : (b + 1) * N]
            out += block + [None] * (N - len(block))
        return out

    def _block(self, kind: str, b: int) -> npt.NDArray[np.uint32]:
        name = f"{kind}-{b:06d}"
        key = (name, self.store.blocks[name].version)
        arr = self._cache.get(key)
        if arr is None:
            for old in [k for k in self._cache if k[0] == name]:
                del self._cache[old]
            arr = self.store.load_block(name)
            self._cache[key] = arr
        return arr

    # ------------------------------------------------------------ enrollment
    def enroll(self, ids: Sequence[str], payload: bytes) -> int:
        """Add templates (see :meth:`CkksEdgeCipher.encrypt_templates`); replaces re-enrolled ids.

        Raises:
            DecodeError / KeyMismatchError: the payload is malformed or for another key.
            InvalidArgumentError: ids do not match the payload's count, or repeat.
        """
        obj = _decode(payload, self.pub, "templates", DecodeError)
        N, d, k = self.params.n, self.dim, self.ring.k
        count = obj.get("count")
        if not isinstance(count, int) or not 1 <= count <= N or count != len(ids):
            raise InvalidArgumentError(f"payload holds {count!r} templates for {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("an id appears twice in one enrollment")
        npack = -(-count // self.per_pack)
        q = self.ring.q
        col0 = _unpack32(obj.get("col"), (d, k, N), "column ciphertexts", q)
        pack0 = _unpack32(obj.get("pack"), (npack, k, N), "packed ciphertexts", q)
        for s in ("col_seed", "pack_seed"):
            if not isinstance(obj.get(s), bytes) or len(obj[s]) != rlwe.SEED_BYTES:
                raise DecodeError(f"templates: bad {s}")
        col = np.stack([col0, rlwe.expand_c1(self.params, obj["col_seed"], d)], axis=1)
        pack = np.stack([pack0, rlwe.expand_c1(self.params, obj["pack_seed"], npack)], axis=1)
        with self._lock:
            # Replaced identities lose their old slot in the same commit as the new one.
            replaced: list[tuple[int, str | None]] = [
                (self._index[i], None) for i in ids if i in self._index
            ]
            start = len(self.store.slots)
            if count > 1 and (start % N) % self.per_pack:
                start += self.per_pack - (start % N) % self.per_pack  # keep packs aligned
            if start % N + count > N:
                start = -(-start // N) * N  # does not fit: open a new block
            b, o = divmod(start, N)
            staged = []
            colb = self._mutable("col", b, (d, 2, k, N))
            mono = self.ring.monomial_ntt(o)[None, None]
            colb += self.ring.mul(col, mono)
            colb %= self.ring.qcol
            staged.append(self.store.stage_block(f"col-{b:06d}", colb.astype(np.uint32)))
            packb = self._mutable("pack", b, (self.npack, 2, k, N))
            first = o // self.per_pack
            shift = (o % self.per_pack) * d  # nonzero only for single templates
            if shift:
                pack = self.ring.mul(pack, self.ring.monomial_ntt(shift)[None, None])
            packb[first : first + npack] = (packb[first : first + npack] + pack) % self.ring.qcol
            staged.append(self.store.stage_block(f"pack-{b:06d}", packb.astype(np.uint32)))
            slots: list[tuple[int, str | None]] = [
                (start + i, ident) for i, ident in enumerate(ids)
            ]
            # Slots skipped for alignment stay None (free, masked in results). A block
            # whose every template was replaced goes whole, in the same commit.
            drop = self._dead_blocks({s for s, _ in replaced}, keep=b)
            self.store.commit(blocks=staged, slots=replaced + slots, drop_blocks=drop)
            for key in [k for k in self._cache if k[0] in drop]:
                del self._cache[key]
            for slot, ident in slots:
                assert ident is not None
                self._index[ident] = slot
        return count

    def _mutable(self, kind: str, b: int, shape: tuple[int, ...]) -> U64:
        name = f"{kind}-{b:06d}"
        if name in self.store.blocks:
            return np.array(self._block(kind, b), dtype=np.uint64)
        return np.zeros(shape, dtype=np.uint64)

    def _dead_blocks(self, dead: set[int], keep: int | None = None) -> list[str]:
        """Files of the full blocks (other than ``keep``) left with no live slot."""
        N, drop = self.params.n, []
        for b in sorted({s // N for s in dead} - {keep}):
            block = self.store.slots[b * N : (b + 1) * N]
            full = len(block) == N
            if full and all(x is None or b * N + i in dead for i, x in enumerate(block)):
                drop += [f"col-{b:06d}", f"pack-{b:06d}"]
        return drop

    # --------------------------------------------------------------- delete
    def delete(self, ids: Sequence[str]) -> int:
        """Erase identities (unlinked at once, masked in results). Durable on return."""
        with self._lock:
            return self._delete_locked([i for i in ids if i in self._index])

    def _delete_locked(self, ids: list[str]) -> int:
        """Unlink identities; drop a block's files once every slot of a full block is dead.

        The ciphertext of a deleted template cannot be overwritten in place: any pad
        large enough to hide it would swamp the noise of every other score of its
        block. Its slot is masked with fresh randomness in every later result, and the
        ciphertext itself is destroyed with its block (see docs/security.md).
        """
        if not ids:
            return 0
        slots: list[tuple[int, str | None]] = [(self._index[i], None) for i in ids]
        drop = self._dead_blocks({s for s, _ in slots})
        self.store.commit(slots=slots, drop_blocks=drop)
        for key in [k for k in self._cache if k[0] in drop]:
            del self._cache[key]
        for i in ids:
            del self._index[i]
        return len(ids)

    # --------------------------------------------------------------- queries
    def _probe(self, probe: bytes, kind: str, count: int) -> npt.NDArray[np.uint32]:
        obj = _decode(probe, self.pub, kind, DecodeError)
        k, N = self.ring.k, self.params.n
        c0 = _unpack32(obj.get("c0"), (count, k, N), kind, self.ring.q)
        seed = obj.get("seed")
        if not isinstance(seed, bytes) or len(seed) != rlwe.SEED_BYTES:
            raise DecodeError(f"{kind}: bad seed")
        c1 = rlwe.expand_c1(self.params, seed, count)
        return np.stack([c0, c1], axis=1).astype(np.uint32)

    def verify(self, identity: str, probe: bytes) -> bytes:
        """Encrypted similarity of ``probe`` against one identity, as a 32 KB LWE sample.

        Raises:
            UnknownIdentityError: not enrolled.
            DecodeError / KeyMismatchError: bad probe.
        """
        p = self._probe(probe, "probe-verify", 1)[0].astype(np.uint64)
        with self._lock:
            slot = self._index.get(identity)
            if slot is None:
                raise UnknownIdentityError(f"identity {identity!r} is not enrolled at this site")
            b, o = divmod(slot, self.params.n)
            ct = self._block("pack", b)[o // self.per_pack].astype(np.uint64)
        return lwe_result(self.pub, ct, p, (o % self.per_pack) * self.dim)

    def verify_many(self, items: Sequence[tuple[str, bytes]]) -> list[bytes | Exception]:
        """:meth:`verify` for a batch of ``(identity, probe)``; one bad item fails alone.

        Returns:
            Per item, the result bytes or the exception :meth:`verify` would raise.
        """
        out: list[bytes | Exception] = [b""] * len(items)
        good: list[int] = []
        xs, ys, offsets = [], [], []
        for i, (identity, probe) in enumerate(items):
            try:
                p = self._probe(probe, "probe-verify", 1)[0]
                with self._lock:
                    slot = self._index.get(identity)
                    if slot is None:
                        raise UnknownIdentityError(
                            f"identity {identity!r} is not enrolled at this site"
                        )
                    b, o = divmod(slot, self.params.n)
                    ct = self._block("pack", b)[o // self.per_pack]
            except Exception as exc:  # per item, as verify() would raise it
                out[i] = exc
                continue
            good.append(i)
            xs.append(ct)
            ys.append(p)
            offsets.append((o % self.per_pack) * self.dim)
        if good:
            x = np.stack(xs).astype(np.uint64)
            y = np.stack(ys).astype(np.uint64)
            for i, res in zip(good, lwe_results(self.pub, x, y, offsets), strict=True):
                out[i] = res
        return out

    def identify(self, probe: bytes) -> tuple[bytes, int]:
        """Encrypted similarities against every slot (free/deleted slots: random).

        Returns:
            ``(result bytes, slot count)``; the count equals ``len(self.ids())``.
        """
        p = self._probe(probe, "probe-identify", self.dim)
        with self._lock:
            live_blocks = self._live_blocks()
            blocks = [self._block("col", b) for b in live_blocks]
            slots = self._ids_locked()
            nblocks = len(blocks)
        out = np.empty((3, self.ring.k, self.params.n), dtype=np.uint64)
        q0 = int(self.ring.q[0])
        results = []
        live = np.array([s is not None for s in slots], dtype=bool).reshape(nblocks, self.params.n)
        for b, g in enumerate(blocks):
            with rlwe.PARALLEL_LOCK:
                _mac_block(np.asarray(g), p, self.ring.q, out)
            res = finish_product(self.ring, out)
            dead = ~live[b]
            if dead.any():
                res[0, 0, dead] = self.ring.uniform(())[0, dead] % np.uint64(q0)
            results.append(_pack32(res))
        body = {**_header(self.pub, "result-identify"), "count": len(slots), "blocks": results}
        return cast(bytes, msgpack.packb(body, use_bin_type=True)), len(slots)

    def close(self) -> None:
        self.store.close()


def _shift_down(c: U64, t: int, q: int) -> U64:
    """Multiply coefficient-domain residues ``(..., N)`` mod ``q`` by ``X^-t`` in
    ``Z_q[X]/(X^N+1)``: coefficient ``t`` moves to 0, those that wrap past ``X^0``
    change sign."""
    if t == 0:
        return c
    n = c.shape[-1]
    out = np.roll(c, -t, axis=-1)
    wrapped = out[..., n - t :]
    out[..., n - t :] = (np.uint64(q) - wrapped) % np.uint64(q)
    return out


__all__ = ["CkksEdgeCipher", "CkksGallery", "CkksKeys", "CkksPublic"]
