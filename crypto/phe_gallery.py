"""The encrypted gallery engine on the Paillier family (``EdgeCipher`` / ``Gallery``).

**The cloud sees the probe.** Paillier-family schemes cannot multiply two ciphertexts,
so one side of the dot product must be plaintext where it is computed: the templates
are encrypted by the edge, and the probe travels to the cloud as fixed-point integers
(as in cipherface 0.0.2's ``CipherFaceLite``, where the cloud embeds the target photo
itself). The cloud learns the probe embedding of every verify/identify, never an
enrolled template, a score or a key. Use CKKS (:mod:`cipherface.crypto.ckks`) when the
probe must stay hidden too.

Layout. A *block* holds ``K`` templates (:attr:`Packing.slots`, 26 at 2048 bits for
d=128) in ``d`` ciphertexts: ciphertext ``j`` packs feature ``j`` of every template of
the block, template in slot ``s`` at bit ``s w``. The scores of the whole block are one
multi-exponentiation ``prod_j C_j^(P_j)`` with the small probe integers as exponents
(Pippenger's bucket method; negative ``P_j`` handled by exponents ``P_j + 2^f`` and a
stored ``D = (prod_j C_j)^-1`` raised to ``2^f``). The cloud then adds ``2^(2f+1)`` to
every slot (scores become positive), adds a uniform mask to every slot the requester may
not see, and multiplies by a fresh encryption of zero.

Masking: in ``verify`` every slot but the asked identity's gets a mask; in ``identify``
free and deleted slots do. Slots are wide enough that a mask never carries into the next
slot and hides the value within statistical distance ``2^-mask_bits`` (:class:`Packing`).
Masked slots decode to NaN at the edge (their value falls outside the honest range
except with probability ~2^-41); map scores to identities with :meth:`PheGallery.ids`.

Enrollment: the edge fills whole blocks (slots 0..K-1) and puts a remainder at random
distinct slots; the cloud merges such a chunk into the first block where those slots are
free by multiplying ciphertexts (no re-encryption, one block file rewritten). Deleting
marks the slot dead (masked forever after); a block whose slots are all dead or free is
dropped. A deleted template's contribution stays inside its block's ciphertexts (under
the edge's key) until the block is dropped: re-enroll the site under a new key to purge.

Formats (msgpack maps; see docs/crypto-phe.md): ``templates``, ``probe``, ``scores`` and
``embedding``, each with ``format``, ``kind``, ``scheme``, ``key_id``, ``count``,
``packing`` and raw fixed-width big-endian ciphertext bytes. Everything is validated
before use; results are checked (scheme, key id, op, count, sizes, ranges) before a
single ciphertext is decrypted.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import gmpy2
import msgpack
import numpy as np
import numpy.typing as npt
from gmpy2 import mpz

from cipherface.crypto import phe
from cipherface.crypto.engine import FloatArray, ProbeOp
from cipherface.crypto.keyfile import KeyFile
from cipherface.crypto.phe import Packing, PhePrivateKey, PhePublicKey, Rerandomizer
from cipherface.crypto.store import GalleryStore, Reply, with_reply
from cipherface.crypto.wire import unpack_bounded
from cipherface.errors import (
    DecodeError,
    GalleryError,
    InvalidArgumentError,
    KeyMismatchError,
    PayloadTooLargeError,
    ResultForgedError,
    ResultRejectedError,
    StorageCorruptError,
    UnknownIdentityError,
)

__all__ = [
    "FORMAT",
    "PheEdgeCipher",
    "PheGallery",
    "compare_embedding",
    "edge_cipher_from_key_file",
    "generate_key_dir",
    "open_gallery",
    "public_from_bytes",
]

FORMAT: Final = "cf-phe/1"
MAX_MESSAGE: Final = 512 * 1024 * 1024
MAX_COUNT: Final = 1 << 24
_DEAD: Final = ""  # store value of a deleted slot: not free (its ciphertext part is stale)
_POOL_MIN_BLOCKS: Final = 16
_OPS: Final = ("verify", "identify")
#: Decoding limits of every message: fields per map and bytes per string (format, kind,
#: scheme, key_id, op and field names are all short).
_MAX_MAP: Final = 16
_MAX_STR: Final = 64
_T = TypeVar("_T")


# ----------------------------------------------------------------- multi-exponentiation
@dataclass(frozen=True)
class _Plan:
    """Pippenger schedule of one probe: per window (high first), buckets (digit, bases)."""

    window: int
    wins: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...]


def _make_plan(exps: Sequence[int]) -> _Plan:
    """Choose the window minimising the multiplication count for these exponents."""
    nbits = max(1, max(int(e).bit_length() for e in exps))
    best: tuple[int, _Plan] | None = None
    for c in range(2, 9):
        nwin = -(-nbits // c)
        wins = []
        cost = c * (nwin - 1)
        for k in reversed(range(nwin)):
            groups: dict[int, list[int]] = {}
            for j, e in enumerate(exps):
                v = (int(e) >> (k * c)) & ((1 << c) - 1)
                if v:
                    groups.setdefault(v, []).append(j)
            items = tuple((v, tuple(js)) for v, js in sorted(groups.items(), reverse=True))
            wins.append(items)
            if items:
                cost += sum(len(js) - 1 for _, js in items) + len(items) + items[0][0]
        plan = _Plan(window=c, wins=tuple(wins))
        if best is None or cost < best[0]:
            best = (cost, plan)
    assert best is not None
    return best[1]


def _multi_exp(bases: Sequence[Any], plan: _Plan, mod: Any) -> Any:
    """``prod_j bases[j]^exps[j] mod m`` with the bucket method (same plan for all blocks)."""
    acc = None
    for win in plan.wins:
        if acc is not None:
            for _ in range(plan.window):
                acc = acc * acc % mod
        if not win:
            continue
        # Running sums from the top digit down: T = prod_v B_v^v.
        s_acc = t_acc = None
        prev = 0
        for v, js in win:
            b = bases[js[0]]
            for j in js[1:]:
                b = b * bases[j] % mod
            if s_acc is not None:
                for _ in range(prev - v):
                    t_acc = s_acc if t_acc is None else t_acc * s_acc % mod
                s_acc = s_acc * b % mod
            else:
                s_acc = b
            prev = v
        for _ in range(prev):
            t_acc = s_acc if t_acc is None else t_acc * s_acc % mod
        acc = t_acc if acc is None else acc * t_acc % mod
    return mpz(1) if acc is None else acc


def _probe_plan(probe: npt.NDArray[np.int64], packing: Packing) -> _Plan:
    unit = packing.unit
    return _make_plan([int(v) + unit for v in probe.tolist()] + [unit])


class _Scorer:
    """Cloud-side arithmetic of one public key: block scores, plaintext adds, rerandomising."""

    def __init__(self, pub: PhePublicKey, *, table: bool) -> None:
        self.pub = pub
        self.mod = pub.modulus
        self.rr = Rerandomizer(pub, table=table)
        self._g = (
            phe.FixedBase(pub.g, pub.n, pub.pbits)
            if table and pub.scheme == phe.OKAMOTO_UCHIYAMA
            else None
        )

    def g_pow(self, m: int) -> Any:
        if self._g is not None:
            return self._g.pow(m)
        return self.pub.g_pow(m)

    def result(self, rows: list[Any] | None, plan: _Plan, addend: int) -> Any:
        """Encrypted slots of one block (rows = ``d`` columns + ``D``), plus ``addend``."""
        acc = mpz(1) if rows is None else _multi_exp(rows, plan, self.mod)
        return acc * self.g_pow(addend) % self.mod * self.rr.zero() % self.mod


def _inverse_product(cols: Sequence[Any], mod: Any) -> Any:
    prod = mpz(1)
    for c in cols:
        prod = prod * c % mod
    return gmpy2.invert(prod, mod)


def _rows_to_array(rows: Sequence[Any], width: int) -> npt.NDArray[np.uint8]:
    data = b"".join(mpz(r).to_bytes(width, "big") for r in rows)
    return np.frombuffer(data, dtype=np.uint8).reshape(len(rows), width).copy()


def _array_to_rows(arr: npt.NDArray[Any]) -> list[Any]:
    return [mpz.from_bytes(arr[i].tobytes(), "big") for i in range(arr.shape[0])]


def _split_cts(data: object, width: int, count: int, what: str, err: type[Exception]) -> list[Any]:
    if not isinstance(data, bytes) or len(data) != width * count:
        raise err(f"{what}: expected {count} ciphertexts of {width} bytes")
    return [mpz.from_bytes(data[i * width : (i + 1) * width], "big") for i in range(count)]


# --------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _worker_init(public_key: bytes) -> None:  # pragma: no cover - runs in a child process
    pub = phe.public_key_from_bytes(public_key)
    _WORKER["scorer"] = _Scorer(pub, table=True)
    _WORKER["shape"] = (pub.dim + 1, pub.ct_bytes)


def _worker_run(
    plan: _Plan, jobs: list[tuple[npt.NDArray[Any] | None, int]]
) -> list[bytes]:  # pragma: no cover - runs in a child process
    scorer: _Scorer = _WORKER["scorer"]
    width = scorer.pub.ct_bytes
    out = []
    for arr, addend in jobs:
        rows = None
        if arr is not None:  # checked by the store (digest) and the parent (shape)
            rows = _array_to_rows(arr)
        out.append(scorer.result(rows, plan, addend).to_bytes(width, "big"))
    return out


def _warm() -> bool:  # pragma: no cover - runs in a child process
    return "scorer" in _WORKER


# ------------------------------------------------------------------------ wire helpers
def _header(pub: PhePublicKey, packing: Packing, kind: str, count: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": kind,
        "scheme": pub.scheme,
        "key_id": pub.key_id,
        "count": count,
        "packing": packing.to_dict(),
    }


def _pack(obj: dict[str, Any]) -> bytes:
    return cast(bytes, msgpack.packb(obj, use_bin_type=True))


def _decode(
    data: object,
    pub: PhePublicKey,
    packing: Packing,
    kind: str,
    err: type[Exception],
    mismatch: type[Exception] = KeyMismatchError,
) -> dict[str, Any]:
    """Parse and check the common header; ``err`` for malformed, ``mismatch`` for wrong key."""
    if not isinstance(data, bytes | bytearray):
        raise err(f"{kind}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise PayloadTooLargeError(f"{kind}: {len(data)} bytes exceeds {MAX_MESSAGE}")
    data = bytes(data)
    if kind == "templates":
        # [slots, cts] chunks: each carries dim ciphertexts, so len(data) bounds their number.
        chunks = len(data) // (pub.dim * pub.ct_bytes) + 1
        max_array, max_containers = max(chunks, packing.slots, 2), 3 + 2 * chunks
    else:  # probe / scores / embedding: the message map and its packing map, no arrays
        max_array, max_containers = 0, 2
    try:
        obj = unpack_bounded(
            data,
            max_containers=max_containers,
            max_array_len=max_array,
            max_map_len=_MAX_MAP,
            max_str_len=_MAX_STR,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise err(f"{kind}: not a msgpack message ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise err(f"{kind}: not a {FORMAT} message")
    if obj.get("kind") != kind:
        raise err(f"expected a {kind!r} message, got {obj.get('kind')!r}")
    if obj.get("scheme") != pub.scheme:
        raise mismatch(f"{kind} is a {obj.get('scheme')!r} message, this key is {pub.scheme}")
    if obj.get("key_id") != pub.key_id:
        raise mismatch(f"{kind} was made for key {obj.get('key_id')!r}, not {pub.key_id}")
    if obj.get("packing") != packing.to_dict():
        raise mismatch(f"{kind}: packing parameters {obj.get('packing')!r} differ from this key's")
    count = obj.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COUNT:
        raise err(f"{kind}: bad count {count!r}")
    return obj


def _decode_probe(
    data: object, pub: PhePublicKey, packing: Packing, op: ProbeOp
) -> npt.NDArray[np.int64]:
    obj = _decode(data, pub, packing, "probe", DecodeError)
    if obj.get("op") != op:
        raise DecodeError(f"probe is for {obj.get('op')!r}, not {op!r}")
    raw = obj.get("probe")
    if obj["count"] != 1 or not isinstance(raw, bytes) or len(raw) != 4 * packing.dim:
        raise DecodeError(f"probe: expected {packing.dim} big-endian int32 values")
    vec = np.frombuffer(raw, dtype=">i4").astype(np.int64)
    if not packing.check_probe(vec):
        raise DecodeError("probe is not a rounded unit vector of this key's precision")
    return vec


def _encode_columns(tq: npt.NDArray[np.int64], slots: Sequence[int], packing: Packing) -> list[int]:
    """Column plaintexts of a chunk: ``M_j = sum_i T[i, j] 2^(slots[i] w)`` (signed)."""
    w = packing.slot_bits
    cols = tq.T.tolist()
    shifts = [s * w for s in slots]
    return [sum(v << sh for v, sh in zip(col, shifts)) for col in cols]


# ------------------------------------------------------------------------------- edge
class PheEdgeCipher:
    """Edge side: encrypts templates with the secret key (CRT fast path), encodes probes,
    checks and decrypts results.

    Args:
        key: the site's private key.

    Example:
        >>> key = phe.generate_private_key("paillier", bits=2048, dim=128)  # doctest: +SKIP
        >>> edge = PheEdgeCipher(key=key)  # doctest: +SKIP
    """

    def __init__(self, *, key: PhePrivateKey) -> None:
        if not isinstance(key, PhePrivateKey):
            raise InvalidArgumentError("PheEdgeCipher needs a PhePrivateKey")
        self.key = key
        self.public = key.public
        self.scheme = key.public.scheme
        self.key_id = key.public.key_id
        self.dim = key.public.dim
        self.packing = Packing.for_key(key.public)
        self.model = key.public.model
        self.metric = key.public.metric
        # One payload stays well inside a protocol message (60 MiB payload limit).
        self.max_templates_per_payload = 4096
        self._pool: list[Any] = []
        self._lock = threading.Lock()

    def public_key_bytes(self) -> bytes:
        """The public key file as bytes (``n`` and parameters only)."""
        return self.public.to_bytes()

    def precompute(self, count: int) -> int:
        """Prepare ``count`` encryptions of zero now (idle time) so that later encryptions
        cost one multiplication each. Each is used once. Returns the pool size."""
        fresh = [self.key.random_zero() for _ in range(max(0, int(count)))]
        with self._lock:
            self._pool.extend(fresh)
            return len(self._pool)

    def _encrypt(self, m: int) -> Any:
        with self._lock:
            z = self._pool.pop() if self._pool else None
        if z is None:
            return self.key.encrypt(m)
        return self.key.g_pow(m) * z % self.public.modulus

    def encrypt_columns(self, tq: npt.NDArray[np.int64], slots: Sequence[int]) -> bytes:
        """Encrypt the ``d`` column ciphertexts of templates ``tq`` placed at ``slots``."""
        width = self.public.ct_bytes
        return b"".join(
            self._encrypt(m).to_bytes(width, "big")
            for m in _encode_columns(tq, slots, self.packing)
        )

    def encrypt_templates(self, vectors: npt.ArrayLike) -> bytes:
        """Encrypt ``n`` templates (shape ``(n, dim)``; normalised here) as one payload.

        Whole blocks of ``K`` fill slots ``0..K-1``; a remainder goes to random distinct
        slots, so single enrollments spread over the cloud's partly filled blocks.

        Raises:
            InvalidArgumentError: wrong shape, non-finite values or a zero vector.
        """
        tq = self.packing.quantise(vectors)
        k = self.packing.slots
        chunks = []
        for start in range(0, len(tq), k):
            part = tq[start : start + k]
            if len(part) == k:
                slots = list(range(k))
            else:
                slots = sorted(secrets.SystemRandom().sample(range(k), len(part)))
            chunks.append([slots, self.encrypt_columns(part, slots)])
        body = _header(self.public, self.packing, "templates", len(tq))
        body["chunks"] = chunks
        return _pack(body)

    def encrypt_probe(self, vector: npt.ArrayLike, *, op: ProbeOp) -> bytes:
        """Encode one probe for ``verify`` or ``identify`` (plaintext fixed-point: the cloud
        sees it, see the module docstring).

        Raises:
            InvalidArgumentError: bad shape/values or unknown ``op``.
        """
        if op not in _OPS:
            raise InvalidArgumentError(f"op must be 'verify' or 'identify', not {op!r}")
        pq = self.packing.quantise(vector)
        if pq.shape[0] != 1:
            raise InvalidArgumentError("encrypt_probe takes one embedding")
        body = _header(self.public, self.packing, "probe", 1)
        body.update(op=op, probe=pq[0].astype(">i4").tobytes())
        return _pack(body)

    def decrypt_scores(self, result: bytes, *, op: ProbeOp, count: int) -> FloatArray:
        """Check that ``result`` answers ``op`` with ``count`` scores under this key, then
        decrypt. Masked (free/deleted) slots come back as NaN.

        Raises:
            ResultRejectedError: malformed, another scheme/key/packing, wrong op or count,
                ciphertexts out of range; never decrypted.
            ResultForgedError: decrypted, but outside the slot layout, or a verify score
                outside the honest range (a tampered result).
        """
        rej = ResultRejectedError
        obj = _decode(result, self.public, self.packing, "scores", rej, mismatch=rej)
        if obj.get("op") != op:
            raise rej(f"result answers {obj.get('op')!r}, {op!r} was asked")
        if obj["count"] != count:
            raise rej(f"result holds {obj['count']} scores, {count} were expected")
        k = self.packing.slots
        if op == "verify":
            slot = obj.get("slot")
            if count != 1 or not isinstance(slot, int) or not 0 <= slot < k:
                raise rej("verify result must hold one score and its slot index")
            nct = 1
        else:
            nct = -(-count // k)
        cts = _split_cts(obj.get("cts"), self.public.ct_bytes, nct, "scores", rej)
        if not all(self.public.check_ciphertext(c) for c in cts):
            raise rej("result holds a value that is not a ciphertext of this key")
        limit = 1 << (k * self.packing.slot_bits)
        plains = self.key.decrypt_many(cts)
        # After decryption a refusal is a bit about the plaintext: ResultForgedError, which
        # a guard counts (judge.py), so a cloud cannot ask for such bits without limit.
        if any(m >= limit for m in plains):
            raise ResultForgedError("result decrypts outside the slot layout (tampered result)")
        if op == "verify":
            v = self.packing.decode(self.packing.unpack(int(plains[0]))[obj["slot"]])
            if math.isnan(v):
                raise ResultForgedError("verify score is outside the honest range (tampered)")
            return np.array([v], dtype=np.float64)
        out = np.empty(nct * k, dtype=np.float64)
        pos = 0
        for m in plains:
            for v in self.packing.unpack(int(m)):
                out[pos] = self.packing.decode(v)
                pos += 1
        return out[:count]


# ------------------------------------------------------------------------------ cloud
class _RWLock:
    """Many readers (scoring) or one writer (enroll/delete): block files stay put while
    workers read them (a commit unlinks superseded versions).

    Writers have priority: once a writer waits, new readers queue behind it, so steady
    identify traffic cannot starve enroll/delete (readers already in finish first). Not
    reentrant: a thread holding ``read`` must not take it again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            except BaseException:  # interrupted: let the readers queued behind us go
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class PheGallery:
    """Cloud side: one site's encrypted gallery (public key only).

    Args:
        path: gallery directory (created if missing).
        public: the site's public key (:func:`public_from_bytes`).
        workers: processes for :meth:`identify` (default: CPU count; 0 or 1 = in-process).
            gmpy2 holds the GIL for multiplications, so threads would not scale.

    Raises:
        GalleryError: the directory holds a gallery for another key or layout.
        StorageCorruptError: a gallery file fails its integrity checks.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        public: PhePublicKey,
        workers: int | None = None,
    ) -> None:
        if not isinstance(public, PhePublicKey):
            raise InvalidArgumentError("PheGallery needs a PhePublicKey")
        self.pub = public
        self.scheme = public.scheme
        self.key_id = public.key_id
        self.dim = public.dim
        self.packing = Packing.for_key(public)
        self._k = self.packing.slots
        self._width = public.ct_bytes
        meta = {
            "scheme": self.scheme,
            "key_id": self.key_id,
            "dim": self.dim,
            "format": FORMAT,
            "packing": self.packing.to_dict(),
            "ct_bytes": self._width,
        }
        self.store = GalleryStore(path, meta=meta)
        for k in ("format", "packing", "ct_bytes"):
            if self.store.meta.get(k) != meta[k]:
                raise GalleryError(f"gallery {self.store.label} has {k}={self.store.meta.get(k)!r}")
        self._rw = _RWLock()
        self._workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._scorer: _Scorer | None = None
        self._scorer_lock = threading.Lock()
        self._offsets = sum(
            self.packing.offset << (s * self.packing.slot_bits) for s in range(self._k)
        )
        self._rebuild()

    # ------------------------------------------------------------------ state
    @staticmethod
    def _name(b: int) -> str:
        return f"phe-{b:06d}"

    def _rebuild(self) -> None:
        """Derive the in-memory indexes from the store (at open and after a failed write)."""
        k = self._k
        self._existing: set[int] = set()
        for name in self.store.blocks:
            if not name.startswith("phe-") or not name[4:].isdigit():
                raise StorageCorruptError(f"unexpected block {name!r} in a PHE gallery")
            self._existing.add(int(name[4:]))
        self._index: dict[str, int] = {}
        self._free: dict[int, set[int]] = {}
        slots = self.store.slots
        for b in self._existing:
            free = {s for s in range(k) if self._slot(slots, b * k + s) is None}
            if free:
                self._free[b] = free
        for g, ident in enumerate(slots):
            if ident:
                if g // k not in self._existing:
                    raise StorageCorruptError(f"slot {g} ({ident!r}) has no block")
                self._index[ident] = g

    @staticmethod
    def _slot(slots: list[str | None], g: int) -> str | None:
        return slots[g] if g < len(slots) else None

    def _nblocks(self) -> int:
        top = max(self._existing) + 1 if self._existing else 0
        return max(top, -(-len(self.store.slots) // self._k))

    @property
    def count(self) -> int:
        """Number of live (not deleted) templates."""
        return len(self._index)

    @property
    def ids_version(self) -> int:
        """Increases whenever the slot -> identity mapping changes."""
        return self.store.ids_version

    def ids(self) -> list[str | None]:
        """Identity of every slot in score order; ``None`` for free or deleted slots."""
        with self._rw.read():
            n = self._nblocks() * self._k
            out: list[str | None] = [i or None for i in self.store.slots[:n]]
            return out + [None] * (n - len(out))

    def _rows(self, b: int) -> list[Any]:
        arr = self.store.load_block(self._name(b))
        if arr.shape != (self.dim + 1, self._width) or arr.dtype != np.uint8:
            raise StorageCorruptError(f"gallery block {b} has shape {arr.shape}")
        return _array_to_rows(arr)

    # ------------------------------------------------------------- enrollment
    def _decode_templates(self, payload: bytes, n_ids: int) -> list[tuple[list[int], list[Any]]]:
        obj = _decode(payload, self.pub, self.packing, "templates", DecodeError)
        count, chunks = obj["count"], obj.get("chunks")
        if count != n_ids:
            raise InvalidArgumentError(f"payload holds {count} templates for {n_ids} ids")
        if not isinstance(chunks, list) or not chunks:
            raise DecodeError("templates: no chunks")
        out = []
        total = 0
        for ch in chunks:
            if not isinstance(ch, list) or len(ch) != 2 or not isinstance(ch[0], list):
                raise DecodeError("templates: a chunk must be [slots, ciphertexts]")
            slots = ch[0]
            if (
                not slots
                or len(set(slots)) != len(slots)
                or not all(isinstance(s, int) and 0 <= s < self._k for s in slots)
            ):
                raise DecodeError(
                    f"templates: chunk slots must be distinct ints in 0..{self._k - 1}"
                )
            cols = _split_cts(ch[1], self._width, self.dim, "templates", DecodeError)
            if not all(self.pub.check_ciphertext(c) for c in cols):
                raise DecodeError("templates: a value is not a ciphertext of this key")
            total += len(slots)
            out.append((slots, cols))
        if total != count:
            raise DecodeError(f"templates: chunks hold {total} templates, count says {count}")
        return out

    def _find_block(self, want: set[int]) -> int:
        for b in sorted(self._free):
            if want <= self._free[b]:
                return b
        nb = self._nblocks()
        for b in range(nb):
            if b not in self._existing:
                return b  # a dropped block's place
        return nb

    def enroll(self, ids: Sequence[str], payload: bytes, *, reply: Reply | None = None) -> int:
        """Add templates for ``ids`` (payload order) from :meth:`PheEdgeCipher.encrypt_templates`.

        An id already enrolled is replaced (its old slot dies). Durable on return.
        ``reply``: the request's reply, stored in the same commit (``Gallery.enroll``).

        Raises:
            AlreadyAnsweredError: ``reply``'s request was carried out before.
            DecodeError / KeyMismatchError: malformed payload or another key's.
            InvalidArgumentError: ids do not match the payload, repeat, or are empty.
        """
        ids = list(ids)
        if not all(isinstance(i, str) and i for i in ids):
            raise InvalidArgumentError("identities must be non-empty strings")
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("an id appears twice in one enrollment")
        chunks = self._decode_templates(payload, len(ids))
        mod, k = self.pub.modulus, self._k
        with self._rw.write():
            try:
                changes: dict[int, str | None] = {}
                touched: set[int] = set()
                for ident in ids:
                    if ident in self._index:
                        g = self._index.pop(ident)
                        changes[g] = _DEAD
                        touched.add(g // k)
                pending: dict[int, list[Any]] = {}
                pos = 0
                for slots, cols in chunks:
                    b = self._find_block(set(slots))
                    if b in pending:
                        base: list[Any] | None = pending[b]
                    elif b in self._existing:
                        base = self._rows(b)[: self.dim]
                    else:
                        base = None
                        self._existing.add(b)
                        self._free[b] = set(range(k))
                    pending[b] = cols if base is None else [x * y % mod for x, y in zip(base, cols)]
                    for s in slots:
                        changes[b * k + s] = ids[pos]
                        self._index[ids[pos]] = b * k + s
                        self._free[b].discard(s)
                        pos += 1
                    if not self._free[b]:
                        del self._free[b]
                drops = self._empty_blocks(touched - set(pending), changes)
                staged = [
                    self.store.stage_block(
                        self._name(b),
                        _rows_to_array([*cols, _inverse_product(cols, mod)], self._width),
                    )
                    for b, cols in sorted(pending.items())
                ]
                if reply is not None:
                    reply.count = len(ids)
                self.store.commit(
                    blocks=staged,
                    slots=sorted(changes.items()),
                    drop_blocks=[self._name(b) for b in drops],
                    **with_reply(reply),
                )
            except BaseException:
                self._rebuild()
                raise
            self._forget(drops)
        return len(ids)

    def _empty_blocks(self, blocks: set[int], changes: dict[int, str | None]) -> list[int]:
        """Blocks (among ``blocks``) left without a live slot; their dead slots become free."""
        k, slots = self._k, self.store.slots
        out = []
        for b in sorted(blocks):
            vals = [changes.get(g, self._slot(slots, g)) for g in range(b * k, (b + 1) * k)]
            if not any(vals):
                out.append(b)
                for g, v in zip(range(b * k, (b + 1) * k), vals):
                    if v is not None:
                        changes[g] = None
        return out

    def _forget(self, drops: list[int]) -> None:
        for b in drops:
            self._existing.discard(b)
            self._free.pop(b, None)

    def delete(self, ids: Sequence[str], *, reply: Reply | None = None) -> int:
        """Erase identities (slots die, blocks with no live slot are dropped); returns how many
        existed. Durable on return. ``reply``: the request's reply, stored in the same
        commit, or alone when none existed (``Gallery.delete``)."""
        with self._rw.write():
            changes: dict[int, str | None] = {}
            touched: set[int] = set()
            found = [i for i in dict.fromkeys(ids) if i in self._index]
            for ident in found:
                g = self._index[ident]
                changes[g] = _DEAD
                touched.add(g // self._k)
            if reply is not None:
                reply.count = len(found)
            if not found:
                if reply is not None:
                    self.store.commit(reply=reply)  # the reply alone: nothing to change
                return 0
            try:
                drops = self._empty_blocks(touched, changes)
                self.store.commit(
                    slots=sorted(changes.items()),
                    drop_blocks=[self._name(b) for b in drops],
                    **with_reply(reply),
                )
            except BaseException:
                self._rebuild()
                raise
            for ident in found:
                del self._index[ident]
            self._forget(drops)
        return len(found)

    # ------------------------------------------------------------------ scoring
    def _local_scorer(self) -> _Scorer:
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = _Scorer(self.pub, table=True)
            return self._scorer

    def _mask(self, keep: Sequence[bool]) -> int:
        """Offsets for every slot plus a uniform mask in every slot not kept."""
        w, lim = self.packing.slot_bits, self.packing.mask_limit
        add = self._offsets
        for s, ok in enumerate(keep):
            if not ok:
                add += secrets.randbelow(lim) << (s * w)
        return add

    def _result(self, op: str, count: int, cts: bytes, **extra: Any) -> bytes:
        body = _header(self.pub, self.packing, "scores", count)
        body.update(op=op, cts=cts, **extra)
        return _pack(body)

    def quota_scope(self, identity: str) -> str:
        """What a verify of ``identity`` reveals, for the cloud's quotas: that identity
        (every other slot of the result is masked); ``"?"`` when not enrolled."""
        with self._rw.read():
            return f"{self.key_id} {identity}" if identity in self._index else "?"

    def verify(self, identity: str, probe: bytes) -> bytes:
        """Encrypted similarity of ``probe`` against one identity: one ciphertext in which
        every other slot is masked.

        Raises:
            UnknownIdentityError: not enrolled.
            DecodeError / KeyMismatchError: bad probe.
        """
        vec = _decode_probe(probe, self.pub, self.packing, "verify")
        plan = _probe_plan(vec, self.packing)
        with self._rw.read():
            g = self._index.get(identity)
            if g is None:
                raise UnknownIdentityError(f"identity {identity!r} is not enrolled at this site")
            b, t = divmod(g, self._k)
            rows = self._rows(b)
        addend = self._mask([s == t for s in range(self._k)])
        c = self._local_scorer().result(rows, plan, addend)
        return self._result("verify", 1, c.to_bytes(self._width, "big"), slot=t)

    def warmup(self) -> None:
        """Start the worker processes and build their tables now (else on first identify)."""
        if self._workers > 1:
            self._on_pool(lambda pool: list(pool.map(_warm_many, range(self._workers))))
        else:
            self._local_scorer()

    def _get_pool(self) -> ProcessPoolExecutor | None:
        if self._workers <= 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(self.pub.to_bytes(),),
                )
            return self._pool

    def _on_pool(self, work: Callable[[ProcessPoolExecutor], _T]) -> _T:
        """Run ``work`` on the worker pool; if the pool is broken (a worker died, e.g.
        OOM-killed), replace it and try once more.

        Raises:
            BrokenProcessPool: the fresh pool broke too (the next call starts another).
        """
        for attempt in range(2):
            pool = self._get_pool()
            assert pool is not None
            try:
                return work(pool)
            except BrokenProcessPool:
                with self._pool_lock:
                    if self._pool is pool:  # another thread may have replaced it already
                        self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def identify(self, probe: bytes) -> tuple[bytes, int]:
        """Encrypted similarities of ``probe`` against every slot (free/deleted: masked).

        Blocks are split over the worker processes.

        Returns:
            ``(result bytes, slot count)``; the count equals ``len(self.ids())``.

        Raises:
            DecodeError / KeyMismatchError: bad probe.
        """
        vec = _decode_probe(probe, self.pub, self.packing, "identify")
        plan = _probe_plan(vec, self.packing)
        k = self._k
        with self._rw.read():
            nb = self._nblocks()
            slots = self.store.slots
            jobs: list[tuple[npt.NDArray[Any] | None, int]] = []
            for b in range(nb):
                keep = [bool(self._slot(slots, b * k + s)) for s in range(k)]
                arr = None
                if b in self._existing:
                    # In memory and digest-checked by the store; workers get the bytes.
                    arr = self.store.load_block(self._name(b))
                    if arr.shape != (self.dim + 1, self._width) or arr.dtype != np.uint8:
                        raise StorageCorruptError(f"gallery block {b} has shape {arr.shape}")
                jobs.append((arr, self._mask(keep)))
            if self._workers <= 1 or nb < _POOL_MIN_BLOCKS:
                out = self._run_local(plan, jobs)
            else:
                size = max(1, -(-len(jobs) // (4 * self._workers)))

                def run(pool: ProcessPoolExecutor) -> list[bytes]:
                    futs: list[Future[list[bytes]]] = [
                        pool.submit(_worker_run, plan, jobs[i : i + size])
                        for i in range(0, len(jobs), size)
                    ]
                    return [c for f in futs for c in f.result()]

                out = self._on_pool(run)
        return self._result("identify", nb * k, b"".join(out)), nb * k

    def _run_local(
        self, plan: _Plan, jobs: list[tuple[npt.NDArray[Any] | None, int]]
    ) -> list[bytes]:
        scorer = self._local_scorer()
        out = []
        for arr, addend in jobs:
            rows = None
            if arr is not None:
                rows = _array_to_rows(arr)
            out.append(scorer.result(rows, plan, addend).to_bytes(self._width, "big"))
        return out

    def close(self) -> None:
        """Stop the worker processes and close the journal."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def _warm_many(_: int) -> bool:  # pragma: no cover - runs in a child process
    return _warm()


# --------------------------------------------------------------- single comparisons
def compare_embedding(pub: PhePublicKey, embedding: bytes, target: npt.ArrayLike) -> bytes:
    """Cloud side of ``CipherFaceLite.encrypted_compare``: one encrypted embedding (an
    ``embedding`` message) against a plain target. Returns a verify ``scores`` message.

    Raises:
        DecodeError / KeyMismatchError: malformed embedding or another key's.
        InvalidArgumentError: bad target vector.
    """
    packing = Packing.for_key(pub)
    obj = _decode(embedding, pub, packing, "embedding", DecodeError)
    if obj["count"] != 1:
        raise DecodeError("embedding: count must be 1")
    cols = _split_cts(obj.get("cts"), pub.ct_bytes, pub.dim, "embedding", DecodeError)
    if not all(pub.check_ciphertext(c) for c in cols):
        raise DecodeError("embedding: a value is not a ciphertext of this key")
    vec = packing.quantise(target)[0]
    plan = _probe_plan(vec, packing)
    mod = pub.modulus
    rows = [*cols, _inverse_product(cols, mod)]
    w, lim = packing.slot_bits, packing.mask_limit
    addend = sum(packing.offset << (s * w) for s in range(packing.slots))
    addend += sum(secrets.randbelow(lim) << (s * w) for s in range(1, packing.slots))
    c = _Scorer(pub, table=False).result(rows, plan, addend)
    body = _header(pub, packing, "scores", 1)
    body.update(op="verify", slot=0, cts=c.to_bytes(pub.ct_bytes, "big"))
    return _pack(body)


def encrypt_embedding(edge: PheEdgeCipher | PhePublicKey, embedding: npt.ArrayLike) -> bytes:
    """One embedding as an ``embedding`` message (slot 0 of ``d`` ciphertexts): with the
    edge cipher (secret-key fast path) or a public key only (textbook, slower)."""
    if isinstance(edge, PheEdgeCipher):
        pub, packing = edge.public, edge.packing
        tq = packing.quantise(embedding)
        if tq.shape[0] != 1:
            raise InvalidArgumentError("encrypt takes one embedding")
        cts = edge.encrypt_columns(tq, [0])
    else:
        pub = edge
        packing = Packing.for_key(pub)
        tq = packing.quantise(embedding)
        if tq.shape[0] != 1:
            raise InvalidArgumentError("encrypt takes one embedding")
        cts = b"".join(
            pub.encrypt(m).to_bytes(pub.ct_bytes, "big") for m in _encode_columns(tq, [0], packing)
        )
    body = _header(pub, packing, "embedding", 1)
    body["cts"] = cts
    return _pack(body)


# ------------------------------------------------------------ entry points for sites.py
def generate_key_dir(
    directory: str | os.PathLike[str],
    *,
    scheme: str,
    dim: int,
    model: str = "Dlib",
    metric: str = "cosine",
    security_level: int = 128,
) -> str:
    """Write ``private.key`` (0600) and ``public.key`` for a new key pair; return the key id.

    Raises:
        InsecureParametersError: security level below 112.
        InvalidArgumentError: unknown scheme or level.
    """
    from cipherface.crypto.sites import PRIVATE_NAME, PUBLIC_NAME

    bits = phe.bits_for_security(security_level)
    key = phe.generate_private_key(scheme, bits=bits, dim=dim, model=model, metric=metric)
    d = os.fspath(directory)
    key.save(os.path.join(d, PRIVATE_NAME))
    key.public.save(os.path.join(d, PUBLIC_NAME))
    return key.key_id


def edge_cipher_from_key_file(kf: KeyFile, *, source: str) -> PheEdgeCipher:
    """The edge cipher of a private key file.

    Raises:
        KeyFileError: malformed or public-only key.
    """
    return PheEdgeCipher(key=PhePrivateKey.from_key_file(kf, source=source))


def public_from_bytes(data: bytes) -> PhePublicKey:
    """Parse published public key bytes (raises :class:`KeyMismatchError` if malformed)."""
    return phe.public_key_from_bytes(data)


def open_gallery(
    path: str | os.PathLike[str], public: PhePublicKey, *, workers: int | None = None
) -> PheGallery:
    """Open or create a site's PHE gallery."""
    return PheGallery(path=path, public=public, workers=workers)
