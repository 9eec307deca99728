"""The CKKS engine on Microsoft SEAL: keys, formats, edge encryption and result checks.

Layout (docs/crypto.md has the full argument, docs/seal-interop.md the bytes):

* **Column blocks** for 1:N. A block holds ``N`` templates. Ciphertext ``j`` of the
  block encrypts the polynomial whose coefficient ``k`` is feature ``j`` of template
  ``k``. An identify probe is ``d`` ciphertexts of *constant* polynomials ``p_j``;
  ``sum_j block_j * probe_j`` puts the score of template ``k`` in coefficient ``k``.
* **Packed templates** for 1:1. ``N // d`` templates sit side by side in one
  ciphertext; a verify probe is one ciphertext holding the probe *reversed*
  (``p_0 - sum p_i X^(N-i)``), so coefficient ``i*d`` of the product is the score of
  the pack's template ``i``. The cloud returns the whole rescaled product (a size-3
  SEAL ciphertext); the edge decrypts the target's score, or every slot's
  (:meth:`CkksEdgeCipher.decrypt_pack_scores`, for canaries).

SEAL generates the keys, encrypts (symmetric, seeded, at the edge; public-key
encryptions of zero at the cloud to re-randomise everything it receives) and decrypts.
Values are *coefficient-encoded*: the engine writes the plaintext's NTT residues itself
(:mod:`cipherface.crypto.ntt`, SEAL's transform) and SEAL encrypts that plaintext.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np
import numpy.typing as npt
import tenseal.sealapi as sealapi

from cipherface.crypto import ntt, seal
from cipherface.crypto.engine import FloatArray, ProbeOp, normalise_embeddings
from cipherface.crypto.keyfile import (
    KeyFile,
    fingerprint,
    key_file_bytes,
    load_key_file,
    parse_key_bytes,
    save_key_file,
)
from cipherface.crypto.wire import unpack_bounded
from cipherface.errors import (
    DecodeError,
    InvalidArgumentError,
    KeyFileError,
    KeyMismatchError,
    OutdatedFormatError,
    PublicKeyOnlyError,
    ResultRejectedError,
)

SCHEME = "ckks"
ZERO_POOL = 160  # encryptions of zero kept ready per public key (an identify takes d)
IDLE_BEFORE_FILL = 0.05  # seconds without a request before the pool refills
FORMAT = "cf-ckks/2"  # SEAL serialization inside msgpack (cf-ckks/1: the pre-SEAL engine)
OLD_FORMATS = ("cf-ckks/1",)
#: Smudging noise: uniform in +-2^FLOOD_BITS on every score coefficient before rescaling.
#: Measured product noise of a re-randomised 128-d block (tests/test_seal.py::
#: test_flooding_dominates_product_noise): std about 2^38.9. The flood's std is 2^41.4,
#: about 6x that, and it costs at most 2^42/2^58 = 1.5e-5 of a score.
FLOOD_BITS = 42
MIGRATE_HINT = (
    "create a new key pair with 'cipherface keygen --keys DIR' and re-enroll the site's "
    "faces ('cipherface enroll'); galleries made under the old key cannot be read by it"
)

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]


# ------------------------------------------------------------------ encoding
def _normalise(vectors: npt.ArrayLike, dim: int) -> npt.NDArray[np.float64]:
    return normalise_embeddings(vectors, dim)


def _fixed(x: npt.NDArray[np.float64], params: seal.Params) -> npt.NDArray[np.int64]:
    return np.rint(x * params.delta).astype(np.int64)


def _check_dim(dim: int, params: seal.Params) -> None:
    # Packing needs N // dim templates per ciphertext with no remainder (all deepface
    # models have power-of-two dimensions).
    if not 1 <= dim <= params.n or params.n % dim:
        raise InvalidArgumentError(
            f"dimension {dim} must divide N={params.n} (128, 512, 4096 ... are fine)"
        )


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


def ring_of(params: seal.Params) -> ntt.Ring:
    return ntt.ring_for(params.n, params.data_primes)


# ---------------------------------------------------------------------- keys
#: When set and true, no :class:`ZeroPool` of this process fills (see :func:`hold_fills`).
_fill_hold: Callable[[], bool] | None = None


def hold_fills(held: Callable[[], bool] | None) -> None:
    """Hold every :class:`ZeroPool` filler of this process while ``held()`` is true.

    A compute worker of the cloud agent passes a flag the agent sets while it runs an
    identify's 1:N kernel: encryptions of zero made then would take the cores from it.
    """
    global _fill_hold
    _fill_hold = held


class ZeroPool:
    """Fresh encryptions of zero, made ahead by a background thread, each used once.

    Re-randomising an identify probe takes ``d`` of them (128 SEAL public-key
    encryptions, ~2 ms each); making them between requests keeps that off the request's
    path. Items are SEAL ``Ciphertext`` objects (added with SEAL's ``add_inplace``: no
    serialization round trip); the pool holds at most ``size`` (~128 KB each at
    N=4096) and starts filling at the first :meth:`take`; when it is empty,
    :meth:`take` makes one on the spot. The filler runs only while no request holds
    :meth:`busy` (SEAL holds the GIL and the kernels want both cores).

    Args:
        make: returns one fresh encryption of zero (a SEAL ``Ciphertext``).
        size: how many to keep ready.
    """

    def __init__(self, make: Callable[[], Any], size: int = ZERO_POOL) -> None:
        self._make = make
        self._size = size
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_take = 0.0
        self._busy = 0

    def stop(self) -> None:
        """Drop the prepared encryptions and end the filling thread."""
        with self._lock:
            self._size = 0
            self._items.clear()
        self._wake.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Hold off the filler for the length of a request."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._last_take = time.monotonic()
            self._wake.set()

    def take(self) -> Any:
        """One fresh encryption of zero (never handed out twice)."""
        with self._lock:
            self._last_take = time.monotonic()
            item = self._items.popleft() if self._items else None
            low = len(self._items) < self._size // 2
            if self._thread is None and self._size > 0:
                self._thread = threading.Thread(target=self._fill, name="ckks-zeros", daemon=True)
                self._thread.start()
        if low:
            self._wake.set()
        return self._make() if item is None else item

    def _fill(self) -> None:
        while self._size:
            self._wake.wait()
            self._wake.clear()
            while len(self._items) < self._size:
                hold = _fill_hold
                if (
                    self._busy
                    or time.monotonic() - self._last_take < IDLE_BEFORE_FILL
                    or (hold is not None and hold())
                ):
                    time.sleep(IDLE_BEFORE_FILL)
                    continue
                z = self._make()
                with self._lock:
                    if len(self._items) < self._size:
                        self._items.append(z)


_POOLS: collections.OrderedDict[str, ZeroPool] = collections.OrderedDict()
_POOLS_LOCK = threading.Lock()
MAX_POOLS = 8  # keys with encryptions of zero kept ready (most recently used)


def _pool_for(pub: CkksPublic) -> ZeroPool:
    """One pool per public key, shared by every object of that key; least recently used
    pools beyond :data:`MAX_POOLS` are stopped (their memory and thread released)."""
    with _POOLS_LOCK:
        pool = _POOLS.pop(pub.key_id, None) or ZeroPool(pub.encrypt_zero_ct)
        _POOLS[pub.key_id] = pool
        while len(_POOLS) > MAX_POOLS:
            _POOLS.popitem(last=False)[1].stop()
        return pool


@dataclass(frozen=True, kw_only=True, eq=False)
class CkksPublic:
    """What the cloud holds: parameters, embedding geometry and SEAL's public key bytes.

    Args:
        params: the preset.
        public_key: SEAL ``PublicKey`` serialization (seeded, zstd), as generated.
        dim, model, metric: embedding geometry bound into the key id.
    """

    params: seal.Params
    public_key: bytes = field(repr=False)
    dim: int
    model: str
    metric: str

    @functools.cached_property
    def key_id(self) -> str:
        # dim, model and metric are bound too: changing them must change the key id.
        return fingerprint(
            msgpack.packb(self.params.to_dict()),
            self.public_key,
            msgpack.packb([self.dim, self.model, self.metric]),
        )

    @functools.cached_property
    def _sealed(self) -> tuple[Any, Any, Any]:
        ctx = seal.context_for(self.params)
        pk = seal.load_into(sealapi.PublicKey(), self.public_key, ctx)
        return pk, sealapi.Encryptor(ctx, pk), sealapi.Evaluator(ctx)

    @property
    def data_level(self) -> tuple[int, ...]:
        return seal.parms_ids(self.params)[1]

    @property
    def result_level(self) -> tuple[int, ...]:
        return seal.parms_ids(self.params)[2]

    def public_encrypt(self, plain_ntt: U64) -> bytes:
        """SEAL public-key encryption of one ``(k, N)`` NTT plaintext (the compat cloud's)."""
        _, enc, _ = self._sealed
        pt = seal.load_into(
            sealapi.Plaintext(),
            seal.plaintext_bytes(plain_ntt, parms_id=self.data_level, scale=self.params.delta),
            seal.context_for(self.params),
        )
        ct = sealapi.Ciphertext()
        enc.encrypt(pt, ct)
        return seal.save_bytes(ct)

    def encrypt_zero_ct(self) -> Any:
        """A fresh SEAL public-key encryption of zero at the data level (``Ciphertext``)."""
        _, enc, _ = self._sealed
        zero = sealapi.Ciphertext()
        enc.encrypt_zero(zero)
        zero.scale = self.params.delta  # zero at any scale; SEAL's add wants equal scales
        return zero

    def encrypt_zero(self) -> U64:
        """A fresh SEAL public-key encryption of zero: ``(2, k, N)`` NTT residues."""
        return self.residues(self.encrypt_zero_ct(), "zero")

    def residues(self, ct: Any, what: str) -> U64:
        """A SEAL size-2 data-level ``Ciphertext`` -> ``(2, k, N)`` residues (checked)."""
        return seal.parse_ciphertext(
            seal.save_bytes(ct),
            what=what,
            parms_id=self.data_level,
            size=2,
            n=self.params.n,
            q=ring_of(self.params).q,
        ).data

    @property
    def zeros(self) -> ZeroPool:
        return _pool_for(self)

    def rerandomise(self, data: object, what: str) -> U64:
        """Load a received ciphertext with SEAL and add a fresh public-key encryption of zero.

        Whatever the sender put in ``c0, c1``, the result's ``c1`` is fresh randomness
        from SEAL; only the decryption (plus a little noise) carries over. Each
        encryption of zero is used once (:class:`ZeroPool` makes them ahead of time).

        Returns:
            ``(2, k, N)`` NTT residues at the data level.

        Raises:
            DecodeError: not a ciphertext of this key's parameters.
        """
        ct = self.load_fresh(data, what)
        _, _, ev = self._sealed
        ev.add_inplace(ct, self.zeros.take())  # in SEAL: one serialization, not two
        return self.residues(ct, what)

    def load_fresh(self, data: object, what: str) -> Any:
        """SEAL ``Ciphertext`` of a received size-2 ciphertext at the data level, scale Δ.

        Raises:
            DecodeError: anything else.
        """
        ctx = seal.context_for(self.params)
        raw = seal.check_seeded(data, what, parms_id=self.data_level, n=self.params.n, k=2)
        ct = seal.load_into(sealapi.Ciphertext(), raw, ctx)  # SEAL expands a seed, validates
        if ct.size() != 2 or tuple(ct.parms_id()) != self.data_level or not ct.is_ntt_form():
            raise DecodeError(f"{what}: not a fresh ciphertext of this key's parameters")
        if ct.scale != self.params.delta:
            raise DecodeError(f"{what}: scale {ct.scale} is not 2^{self.params.delta_bits}")
        return ct

    def as_ciphertext(self, data: U64) -> Any:
        """Our ``(2, k, N)`` residues (data level, scale Δ) as a SEAL ``Ciphertext``."""
        raw = seal.ciphertext_bytes(
            data, parms_id=self.data_level, scale=self.params.delta, compress=False
        )
        return seal.load_into(sealapi.Ciphertext(), raw, seal.context_for(self.params))

    def key_file(self) -> KeyFile:
        return KeyFile(
            kind="public",
            scheme=SCHEME,
            key_id=self.key_id,
            params={
                "format": FORMAT,
                **self.params.to_dict(),
                "dim": self.dim,
                "model": self.model,
                "metric": self.metric,
            },
            material={
                "seal_params": seal.save_bytes(seal.encryption_parameters(self.params)),
                "public_key": self.public_key,
            },
        )


class CkksKeys:
    """A site's CKKS key pair (edge) or public part only (cloud: no secret key).

    The secret key is a SEAL ``SecretKey`` and never leaves this object except through
    :meth:`save_private`; ``repr`` shows only the key id.
    """

    def __init__(self, *, public: CkksPublic, secret_key: bytes | None) -> None:
        self.public = public
        self._secret = secret_key
        self._sealed: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        kind = "private" if self._secret is not None else "public"
        return f"CkksKeys(key_id={self.key_id!r}, {kind}, n={self.public.params.n})"

    @property
    def has_secret(self) -> bool:
        return self._secret is not None

    @classmethod
    def generate(
        cls, *, dim: int, model: str = "Dlib", metric: str = "cosine", security_level: int = 128
    ) -> CkksKeys:
        """Generate a key pair with SEAL's ``KeyGenerator``.

        Args:
            dim: embedding dimension (divides N).
            model: face model name, recorded so both sides agree on thresholds.
            metric: ``"cosine"`` or ``"euclidean"``.
            security_level: 128, 192 or 256.

        Raises:
            InvalidArgumentError: unsupported level or dimension.
        """
        params = seal.preset(security_level)
        _check_dim(dim, params)
        if metric not in ("cosine", "euclidean"):
            raise InvalidArgumentError(f"metric must be cosine or euclidean, not {metric!r}")
        kg = sealapi.KeyGenerator(seal.context_for(params))
        pk = sealapi.PublicKey()
        kg.create_public_key(pk)  # (sealapi cannot return the seeded Serializable form)
        public = CkksPublic(
            params=params,
            public_key=seal.save_bytes(pk),
            dim=dim,
            model=model,
            metric=metric,
        )
        return cls(public=public, secret_key=seal.save_bytes(kg.secret_key()))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def require_secret(self) -> tuple[Any, Any]:
        """SEAL's ``(Encryptor, Decryptor)`` for the secret key.

        Raises:
            PublicKeyOnlyError: this key holds only the public part.
        """
        if self._secret is None:
            raise PublicKeyOnlyError(
                "this key holds only the public part: decrypting needs the private key "
                "file (export_private_key / keys/private.key on the edge)"
            )
        if self._sealed is None:
            ctx = seal.context_for(self.public.params)
            sk = seal.load_into(sealapi.SecretKey(), self._secret, ctx)
            self._sealed = (sealapi.Encryptor(ctx, sk), sealapi.Decryptor(ctx, sk))
        return self._sealed

    def save_private(self, path: str | os.PathLike[str]) -> None:
        self.require_secret()
        assert self._secret is not None
        pub = self.public.key_file()
        save_key_file(
            path,
            KeyFile(
                kind="private",
                scheme=SCHEME,
                key_id=pub.key_id,
                params=pub.params,
                material={**pub.material, "secret_key": self._secret},
            ),
        )

    def save_public(self, path: str | os.PathLike[str]) -> None:
        save_key_file(path, self.public.key_file())

    @classmethod
    def from_key_file(cls, kf: KeyFile, *, source: str = "key file") -> CkksKeys:
        """Rebuild keys from a decoded key file, checking every field.

        Raises:
            OutdatedFormatError: a key file of the pre-SEAL engine (names the remedy).
            KeyFileError: not a CKKS key or malformed.
        """
        if kf.scheme != SCHEME:
            raise KeyFileError(f"{source} holds a {kf.scheme} key, not {SCHEME}")
        fmt = kf.params.get("format")
        if fmt is None or fmt in OLD_FORMATS:
            raise OutdatedFormatError(
                f"{source} was written by the pre-SEAL CKKS engine (cf-ckks/1), which this "
                f"version no longer reads: {MIGRATE_HINT}"
            )
        if fmt != FORMAT:
            raise KeyFileError(f"{source}: unknown CKKS key format {fmt!r}")
        try:
            params = seal.Params.from_dict(kf.params)
            dim = kf.params["dim"]
            if not isinstance(dim, int) or isinstance(dim, bool):
                raise KeyFileError(f"{source}: dim must be an int")
            _check_dim(dim, params)
            model = kf.params.get("model", "Dlib")
            metric = kf.params.get("metric", "cosine")
            if not isinstance(model, str) or metric not in ("cosine", "euclidean"):
                raise KeyFileError(f"{source}: bad model or metric")
            pk = kf.material["public_key"]
            if not isinstance(pk, bytes):
                raise KeyFileError(f"{source}: public key must be bytes")
            # SEAL checks the key belongs to these parameters as it loads it.
            seal.load_into(sealapi.PublicKey(), pk, seal.context_for(params))
        except (KeyError, TypeError, ValueError, DecodeError, InvalidArgumentError) as exc:
            raise KeyFileError(f"{source} is malformed: {exc}") from exc
        public = CkksPublic(params=params, public_key=pk, dim=dim, model=model, metric=metric)
        if public.key_id != kf.key_id:
            raise KeyFileError(f"{source}: key id does not match the key material (tampered?)")
        secret = None
        if kf.kind == "private":
            secret = kf.material.get("secret_key")
            if not isinstance(secret, bytes):
                raise KeyFileError(f"{source}: secret key missing or malformed")
        keys = cls(public=public, secret_key=secret)
        if secret is not None:
            try:
                keys.require_secret()
                # The public key must belong to this secret: Enc_pk(0) decrypts to noise.
                edge = CkksEdgeCipher(keys=keys)
                z = sealapi.Ciphertext()
                public._sealed[1].encrypt_zero(z)
                noise = edge._decrypt_coeffs(seal.save_bytes(z), size=2, level=public.data_level)
            except DecodeError as exc:
                raise KeyFileError(f"{source}: secret key malformed") from exc
            if np.abs(noise).max() > 1 << 20:
                raise KeyFileError(f"{source}: public and secret key do not match")
        return keys

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, allow_insecure_permissions: bool = False
    ) -> CkksKeys:
        """Load a private or public CKKS key file.

        Args:
            path: the file.
            allow_insecure_permissions: load a private key that group/others can read.

        Raises:
            KeyFileError: missing, malformed, wrong scheme, outdated, or (private)
                readable by others (:class:`~cipherface.errors.InsecurePermissionsError`).
        """
        kf = load_key_file(
            path, expect_scheme=SCHEME, allow_insecure_permissions=allow_insecure_permissions
        )
        return cls.from_key_file(kf, source=str(path))

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
def header(pub: CkksPublic, kind: str) -> dict[str, Any]:
    return {"f": FORMAT, "kind": kind, "kid": pub.key_id, "n": pub.params.n, "dim": pub.dim}


def decode(data: bytes, pub: CkksPublic, kind: str, err: type[Exception]) -> dict[str, Any]:
    """Decode and check one CKKS msgpack object (format, kind, key id, ring, dimension)."""
    try:
        # One map plus at most two lists (of ciphertexts or blocks).
        obj = unpack_bounded(data, max_containers=3, max_array_len=ntt.MAX_BLOCKS, max_str_len=64)
    except Exception as exc:
        raise err(f"{kind}: not a msgpack CKKS object ({exc})") from exc
    if not isinstance(obj, dict):
        raise err(f"{kind}: not a {FORMAT} object")
    if obj.get("f") in OLD_FORMATS:
        raise err(f"{kind}: made by the pre-SEAL engine ({obj.get('f')}); {MIGRATE_HINT}")
    if obj.get("f") != FORMAT:
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


def flood(params: seal.Params, small: npt.NDArray[np.bool_]) -> tuple[U64, U64]:
    """Smudging noise from the OS CSPRNG, as residues ``(F mod q0, F mod q1)``.

    Coefficients where ``small`` is true get ``F`` uniform in ``[-2^FLOOD_BITS,
    2^FLOOD_BITS)`` (hides the result's template-dependent noise, costs <= 4e-6 of a
    score); every other coefficient gets ``F`` uniform mod ``q0*q1``, which erases it
    (free and deleted slots, and the non-score coefficients of a verify product).
    """
    q0, q1 = (np.uint64(q) for q in params.data_primes)
    keep = np.flatnonzero(small)
    wipe = np.flatnonzero(~small)
    # One draw for both kinds: 8 bytes per flooded coefficient, 16 per erased one.
    raw = np.frombuffer(secrets.token_bytes(8 * (keep.size + 2 * wipe.size)), dtype="<u8")
    f = raw[: keep.size].view("<i8") >> np.int64(63 - FLOOD_BITS)
    f0 = np.empty(params.n, dtype=np.uint64)
    f1 = np.empty(params.n, dtype=np.uint64)
    f0[keep] = np.mod(f, int(q0)).astype(np.uint64)
    f1[keep] = np.mod(f, int(q1)).astype(np.uint64)
    # 64-bit words mod a 30-bit prime: bias below 2^-34.
    u = raw[keep.size :].reshape(2, wipe.size)
    f0[wipe] = u[0] % q0
    f1[wipe] = u[1] % q1
    return f0, f1


def finish_many(pub: CkksPublic, prods: U64, small: npt.NDArray[np.bool_]) -> list[bytes]:
    """Size-3 NTT products ``(B, 3, 2, N)`` at ``(q0, q1)`` -> flooded (``add_plain``),
    rescaled SEAL ciphertexts, one per product; ``small`` ``(B, N)`` as :func:`flood`."""
    floods = [flood(pub.params, s) for s in small]
    f0 = np.stack([f[0] for f in floods])
    f1 = np.stack([f[1] for f in floods])
    res = ring_of(pub.params).rescale_ntt(prods, (f0, f1))
    lvl, scale = pub.result_level, pub.params.result_scale
    return [seal.ciphertext_bytes(r, parms_id=lvl, scale=scale) for r in res]


def product(ring: ntt.Ring, x: U64, y: U64) -> U64:
    """SEAL's ``multiply`` (no relinearisation) of two size-2 NTT ciphertexts -> size 3."""
    q = ring.qcol
    return np.stack(
        [
            ring.mul(x[0], y[0]),
            (ring.mul(x[0], y[1]) + ring.mul(x[1], y[0])) % q,
            ring.mul(x[1], y[1]),
        ]
    )


def pack_result(
    pub: CkksPublic, template: U64, probe: object, *, pos: int, live: Sequence[bool], what: str
) -> bytes:
    """``result-verify``: the flooded, rescaled product of a pack and a received probe.

    The probe is loaded by SEAL (seed expanded) and re-randomised with a fresh
    encryption of zero (:meth:`CkksPublic.rerandomise`); the product (``multiply``
    without relinearisation), flood (``add_plain``) and ``rescale_to_next`` then run on
    its residues in one numba pass (:meth:`~cipherface.crypto.ntt.Ring.mul_rescale_ntt`),
    bit-exact with SEAL's ``Evaluator``
    (tests/test_seal.py::test_kernel_is_bit_exact_with_seal_evaluator) and without
    three more SEAL serialization round trips. Coefficient ``i*d`` carries the score of
    the pack's template ``i`` for every live ``i``; every other coefficient (free and
    deleted templates, cross terms) is erased with uniform noise. ``pos`` is the asked
    template's place in the pack.

    Raises:
        DecodeError: the probe is not a ciphertext of this key's parameters.
    """
    p = pub.params
    ring = ring_of(p)
    x = pub.rerandomise(probe, what)
    small = np.zeros(p.n, dtype=bool)
    small[np.flatnonzero(live) * pub.dim] = True
    res = ring.mul_rescale_ntt(template, x, flood(p, small))
    ct = seal.ciphertext_bytes(res, parms_id=pub.result_level, scale=p.result_scale)
    body = {**header(pub, "result-verify"), "count": 1, "pos": pos, "ct": ct}
    return cast(bytes, msgpack.packb(body, use_bin_type=True))


@dataclass(frozen=True, kw_only=True, eq=False)
class PackJob:
    """One verify's inputs, detached from the gallery (it can cross a process boundary).

    Args:
        template: the identity's pack, ``(2, k, N)`` NTT residues (uint32 or uint64).
        probe: the received probe ciphertext (untrusted: checked by SEAL when loaded).
        pos: the identity's place in the pack.
        live: per template slot of the pack, whether it holds a live template.
    """

    template: npt.NDArray[np.unsignedinteger[Any]]
    probe: object
    pos: int
    live: tuple[bool, ...]


#: Runs :func:`finish_verify` over jobs of one key: here, or in worker processes.
Compute = Callable[[CkksPublic, Sequence[PackJob]], list[bytes | Exception]]


def finish_verify(pub: CkksPublic, job: PackJob) -> bytes:
    """The ``result-verify`` of a prepared job (:func:`pack_result`).

    Raises:
        DecodeError: the probe is not a ciphertext of this key's parameters.
    """
    with pub.zeros.busy():
        return pack_result(
            pub,
            job.template.astype(np.uint64),
            job.probe,
            pos=job.pos,
            live=job.live,
            what="probe-verify",
        )


#: Re-randomises received size-2 ciphertexts of one key -> ``(count, 2, k, N)`` residues:
#: here (:func:`rerandomise_many`), or in worker processes.
Rerandomise = Callable[[CkksPublic, Sequence[object], str], npt.NDArray[np.unsignedinteger[Any]]]


def rerandomise_many(pub: CkksPublic, cts: Sequence[object], what: str) -> U64:
    """:meth:`CkksPublic.rerandomise` of each received ciphertext, in this process.

    Returns:
        ``(len(cts), 2, k, N)`` residues.

    Raises:
        DecodeError: the first ciphertext (in order) that is not one of this key's.
    """
    with pub.zeros.busy():
        return np.stack([pub.rerandomise(c, what) for c in cts])


def finish_many_verify(pub: CkksPublic, jobs: Sequence[PackJob]) -> list[bytes | Exception]:
    """:func:`finish_verify` of each job, in this process; one bad job fails alone."""
    out: list[bytes | Exception] = []
    for job in jobs:
        try:
            out.append(finish_verify(pub, job))
        except Exception as exc:
            out.append(exc)
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
        self.ring = ring_of(self.params)
        self.dim = keys.public.dim
        self.key_id = keys.key_id
        self.per_pack = self.params.n // self.dim
        self.model = keys.public.model
        self.metric = keys.public.metric
        self.max_templates_per_payload = self.params.n  # one block per payload

    def __repr__(self) -> str:
        return f"CkksEdgeCipher(key_id={self.key_id!r}, dim={self.dim})"

    def public_key_bytes(self) -> bytes:
        return self.keys.public_key_bytes()

    # -------------------------------------------------------------- encrypt
    def encrypt_ntt(self, m_ntt: U64) -> list[bytes]:
        """SEAL ``encrypt_symmetric`` (seeded) of NTT plaintexts ``(count, k, N)``."""
        enc, _ = self.keys.require_secret()
        ctx = seal.context_for(self.params)
        level, delta = self.pub.data_level, self.params.delta
        out = []
        for m in m_ntt:
            pt = seal.load_into(
                sealapi.Plaintext(), seal.plaintext_bytes(m, parms_id=level, scale=delta), ctx
            )
            out.append(seal.save_bytes(enc.encrypt_symmetric(pt)))
        return out

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
        col = np.zeros((d, N), dtype=np.int64)
        col[:, :n] = fx.T  # column j: coefficient k = feature j of template k
        npack = -(-n // self.per_pack)
        pack = np.zeros((npack, N), dtype=np.int64)
        for i in range(n):  # template i at ciphertext i // per, coefficients (i % per) * d ...
            off = (i % self.per_pack) * d
            pack[i // self.per_pack, off : off + d] = fx[i]
        body = {
            **header(self.pub, "templates"),
            "count": n,
            "col": self.encrypt_ntt(r.ntt(r.to_rns(col))),
            "pack": self.encrypt_ntt(r.ntt(r.to_rns(pack))),
        }
        return cast(bytes, msgpack.packb(body, use_bin_type=True))

    def encrypt_probe(self, vector: npt.ArrayLike, *, op: ProbeOp) -> bytes:
        """Encrypt one probe: ``verify`` -> one reversed ciphertext; ``identify`` -> ``d``
        constant ciphertexts.

        Raises:
            InvalidArgumentError: wrong dimension or op.
        """
        fx = _fixed(_normalise(vector, self.dim), self.params)[0]
        r, N = self.ring, self.params.n
        body = header(self.pub, "probe-" + op)
        if op == "verify":
            body["ct"] = self.encrypt_ntt(r.ntt(r.to_rns(encode_reversed(fx, N)))[None])[0]
        elif op == "identify":
            # NTT of a constant polynomial is that constant in every position.
            m = np.broadcast_to(r.to_rns(fx[:, None])[..., :1], (self.dim, r.k, N))
            body["cts"] = self.encrypt_ntt(np.ascontiguousarray(m))
        else:
            raise InvalidArgumentError(f"op must be 'verify' or 'identify', not {op!r}")
        return cast(bytes, msgpack.packb(body, use_bin_type=True))

    # -------------------------------------------------------------- decrypt
    def _decrypt_coeffs(
        self, data: object, *, size: int = 3, level: tuple[int, ...] | None = None
    ) -> npt.NDArray[np.int64]:
        """Check a ciphertext's shape, decrypt it with SEAL, return centred coefficients."""
        _, dec = self.keys.require_secret()
        level = self.pub.result_level if level is None else level
        k = 1 if level == self.pub.result_level else 2
        if not isinstance(data, bytes):
            raise DecodeError("ciphertext: expected bytes")
        seal.parse_ciphertext(
            data, what="result", parms_id=level, size=size, n=self.params.n, q=self.ring.q[:k]
        )
        ctx = seal.context_for(self.params)
        ct = seal.load_into(sealapi.Ciphertext(), data, ctx)
        pt = sealapi.Plaintext()
        dec.decrypt(ct, pt)
        m = seal.parse_plaintext(seal.save_bytes(pt), k=k, n=self.params.n)
        return self.ring.centred(self.ring.intt(m[:1])[0], 0)

    def _verify_result(self, result: bytes) -> tuple[npt.NDArray[np.int64], int]:
        obj = decode(result, self.pub, "result-verify", ResultRejectedError)
        if obj.get("count") != 1:
            raise ResultRejectedError("a verify result has exactly one score")
        pos = obj.get("pos")
        if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < self.per_pack:
            raise ResultRejectedError("verify result: bad pack position")
        try:
            return self._decrypt_coeffs(obj.get("ct")), pos
        except DecodeError as exc:
            raise ResultRejectedError(f"result-verify is malformed: {exc}") from exc

    def decrypt_pack_scores(self, result: bytes) -> tuple[FloatArray, int]:
        """Decrypt every slot of a verify result's pack.

        Returns:
            ``(scores, pos)``: one similarity per template slot of the pack (free and
            deleted slots hold noise, not scores) and the asked template's slot.

        Raises:
            ResultRejectedError: not a verify result for this key; nothing decrypted.
        """
        m, pos = self._verify_result(result)
        scores = m[:: self.dim][: self.per_pack] / self.params.result_scale
        return scores.astype(np.float64), pos

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
        if op == "verify":
            if count != 1:
                raise ResultRejectedError("a verify result has exactly one score")
            scores, pos = self.decrypt_pack_scores(result)
            return scores[pos : pos + 1]
        obj = decode(result, self.pub, "result-identify", ResultRejectedError)
        N = self.params.n
        if obj.get("count") != count:
            raise ResultRejectedError(
                f"result-identify carries {obj.get('count')!r} scores, {count} asked"
            )
        blocks = obj.get("blocks")
        if not isinstance(blocks, list) or len(blocks) * N < count or len(blocks) * N - count >= N:
            raise ResultRejectedError(f"identify result has a wrong number of blocks for {count}")
        try:
            m = [self._decrypt_coeffs(b) for b in blocks]
        except DecodeError as exc:
            raise ResultRejectedError(f"result-identify is malformed: {exc}") from exc
        if not m:
            return np.zeros(0, dtype=np.float64)
        return (np.concatenate(m)[:count] / self.params.result_scale).astype(np.float64)


def __getattr__(name: str) -> Any:
    # The cloud half lives in its own module; keep the old import path working.
    if name == "CkksGallery":
        from cipherface.crypto.ckks_gallery import CkksGallery

        return CkksGallery
    raise AttributeError(name)


__all__ = [
    "CkksEdgeCipher",
    "CkksKeys",
    "CkksPublic",
    "PackJob",
    "Rerandomise",
    "finish_verify",
    "hold_fills",
    "rerandomise_many",
]
