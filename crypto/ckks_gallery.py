"""The cloud half of the CKKS engine: one site's encrypted gallery (public key only).

Everything received -- enrolled templates and probes -- is loaded by SEAL and
re-randomised with a fresh SEAL public-key encryption of zero before it is stored or
multiplied (:meth:`CkksPublic.rerandomise`). The 1:N multiply-accumulate runs in a numba
kernel over SEAL's NTT residues (bit-exact with SEAL's ``Evaluator``: tests/test_seal.py);
results are flooded, rescaled and written as SEAL ciphertexts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import cast

import msgpack
import numba
import numpy as np
import numpy.typing as npt

from cipherface.crypto import ntt
from cipherface.crypto.ckks import (
    FORMAT,
    MIGRATE_HINT,
    SCHEME,
    CkksPublic,
    Compute,
    PackJob,
    Rerandomise,
    decode,
    finish_many,
    finish_many_verify,
    finish_verify,
    header,
    rerandomise_many,
    ring_of,
)
from cipherface.crypto.store import GalleryStore, Reply, with_reply
from cipherface.errors import (
    DecodeError,
    InvalidArgumentError,
    OutdatedFormatError,
    UnknownIdentityError,
)

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
IDENTIFY_BATCH = 16  # blocks rescaled together (16 x 192 KB of products)


@numba.njit(cache=True, parallel=True, nogil=True)
def _mac_block(g: U32, p: U32, q: U64, fold: U64, out: U64) -> None:  # pragma: no cover - jit
    """out[c, r, s] = sum_j (g_j x p_j)[c] mod q_r for size-2 inputs -> size-3 output.

    No division in the loop (a 64-bit ``%`` does not vectorise and cost ~10x the
    multiplies): every 4 features each accumulator is folded, ``a = hi * 2^30 + lo``
    -> ``hi * fold + lo`` with ``fold = 2^30 mod q`` (congruent mod q), which keeps it
    below 2^52 so the next 8 products (< 2^60 each) cannot overflow; one ``%`` at the end.
    """
    d, _, k, n = g.shape
    chunk = 512
    per_row = n // chunk
    mask = np.uint64((1 << 30) - 1)
    sh = np.uint64(30)
    for c in numba.prange(k * per_row):
        r = c // per_row
        s0 = (c % per_row) * chunk
        qr = q[r]
        f = fold[r]
        a0 = np.zeros(chunk, dtype=np.uint64)
        a1 = np.zeros(chunk, dtype=np.uint64)
        a2 = np.zeros(chunk, dtype=np.uint64)
        for j in range(d):
            g0r = g[j, 0, r, s0 : s0 + chunk]
            g1r = g[j, 1, r, s0 : s0 + chunk]
            p0r = p[j, 0, r, s0 : s0 + chunk]
            p1r = p[j, 1, r, s0 : s0 + chunk]
            for t in range(chunk):
                g0 = np.uint64(g0r[t])
                g1 = np.uint64(g1r[t])
                p0 = np.uint64(p0r[t])
                p1 = np.uint64(p1r[t])
                a0[t] += g0 * p0
                a1[t] += g0 * p1 + g1 * p0
                a2[t] += g1 * p1
            if j % 4 == 3:
                for t in range(chunk):
                    a0[t] = (a0[t] >> sh) * f + (a0[t] & mask)
                    a1[t] = (a1[t] >> sh) * f + (a1[t] & mask)
                    a2[t] = (a2[t] >> sh) * f + (a2[t] & mask)
        for t in range(chunk):
            out[0, r, s0 + t] = a0[t] % qr
            out[1, r, s0 + t] = a1[t] % qr
            out[2, r, s0 + t] = a2[t] % qr


def _folds(q: U64) -> U64:
    """``2^30 mod q`` per prime, checked small enough for :func:`_mac_block`'s bounds."""
    out = []
    for qi in (int(x) for x in q):
        f = (1 << 30) % qi
        # after a fold: < 2^34 * f + 2^30; then 8 more products < (q-1)^2 each
        if qi >= 1 << 30 or (1 << 34) * f + (1 << 30) + 8 * (qi - 1) ** 2 >= 1 << 64:
            raise InvalidArgumentError(f"prime {qi} is outside the kernel's bounds")
        out.append(f)
    return np.array(out, dtype=np.uint64)


def mac(g: npt.NDArray[np.uint32], p: npt.NDArray[np.uint32], q: U64) -> U64:
    """``sum_j g_j * p_j`` of size-2 NTT ciphertexts ``(d, 2, k, N)`` -> size 3 ``(3, k, N)``."""
    if g.shape[3] % 512:
        raise InvalidArgumentError("the kernel needs N to be a multiple of 512")
    out = np.empty((3, g.shape[2], g.shape[3]), dtype=np.uint64)
    with ntt.PARALLEL_LOCK:
        _mac_block(np.ascontiguousarray(g), np.ascontiguousarray(p), q, _folds(q), out)
    return out


class CkksGallery:
    """One site's encrypted CKKS gallery in the cloud (public key only).

    Args:
        path: gallery directory (created if missing).
        public: the site's public key (:meth:`CkksKeys.from_public_bytes` or ``.public``).

    Raises:
        GalleryError: the directory holds a gallery for another key.
        OutdatedFormatError: the gallery was written by the pre-SEAL engine.
        StorageCorruptError: a gallery file fails its integrity checks.
    """

    scheme = SCHEME

    def __init__(self, *, path: str | os.PathLike[str], public: CkksPublic) -> None:
        self.pub = public
        self.params = public.params
        self.ring = ring_of(self.params)
        self.dim = public.dim
        self.key_id = public.key_id
        self.per_pack = self.params.n // self.dim
        self.npack = -(-self.params.n // self.per_pack)
        self.store = GalleryStore(
            path,
            meta={
                "scheme": SCHEME,
                "format": FORMAT,
                "key_id": self.key_id,
                "dim": self.dim,
                "params": self.params.to_dict(),
            },
            # Every identify reads the column blocks: read and checked once, at open.
            preload=("col-",),
        )
        if self.store.meta.get("format") != FORMAT:
            self.store.close()
            raise OutdatedFormatError(
                f"gallery {self.store.label} was written by the pre-SEAL engine: {MIGRATE_HINT}"
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

    @staticmethod
    def _ciphertexts(cts: object, count: int, what: str) -> list[object]:
        if not isinstance(cts, list) or len(cts) != count:
            raise DecodeError(f"{what}: expected a list of {count} ciphertexts")
        return cts

    def _receive(self, cts: object, count: int, what: str) -> U64:
        """Re-randomise ``count`` received ciphertexts -> ``(count, 2, k, N)`` residues."""
        return rerandomise_many(self.pub, self._ciphertexts(cts, count, what), what)

    # ------------------------------------------------------------ enrollment
    def enroll(self, ids: Sequence[str], payload: bytes, *, reply: Reply | None = None) -> int:
        """Add templates (see :meth:`CkksEdgeCipher.encrypt_templates`); replaces re-enrolled ids.

        ``reply``: the request's reply, stored in the same commit (``Gallery.enroll``).

        Raises:
            AlreadyAnsweredError: ``reply``'s request was carried out before.
            DecodeError / KeyMismatchError: the payload is malformed or for another key.
            InvalidArgumentError: ids do not match the payload's count, or repeat.
        """
        obj = decode(payload, self.pub, "templates", DecodeError)
        N, d, k = self.params.n, self.dim, self.ring.k
        count = obj.get("count")
        if not isinstance(count, int) or not 1 <= count <= N or count != len(ids):
            raise InvalidArgumentError(f"payload holds {count!r} templates for {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("an id appears twice in one enrollment")
        npack = -(-count // self.per_pack)
        with self.pub.zeros.busy():
            col = self._receive(obj.get("col"), d, "column ciphertexts")
            pack = self._receive(obj.get("pack"), npack, "packed ciphertexts")
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
            # Slots skipped for alignment stay None (free, erased in results). A block
            # whose every template was replaced goes whole, in the same commit.
            drop = self._dead_blocks({s for s, _ in replaced}, keep=b)
            if reply is not None:
                reply.count = count
            self.store.commit(
                blocks=staged, slots=replaced + slots, drop_blocks=drop, **with_reply(reply)
            )
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
    def delete(self, ids: Sequence[str], *, reply: Reply | None = None) -> int:
        """Erase identities (unlinked at once, erased in results). Durable on return.

        ``reply``: the request's reply, stored in the same commit (``Gallery.delete``).
        """
        with self._lock:
            found = [i for i in dict.fromkeys(ids) if i in self._index]
            return self._delete_locked(found, reply)

    def _delete_locked(self, ids: list[str], reply: Reply | None = None) -> int:
        """Unlink identities; drop a block's files once every slot of a full block is dead.

        The ciphertext of a deleted template cannot be overwritten in place: any pad
        large enough to hide it would swamp the noise of every other score of its
        block. Its slot is erased with fresh uniform noise in every later result, and
        the ciphertext itself is destroyed with its block (see docs/security.md).
        """
        if reply is not None:
            reply.count = len(ids)
        if not ids:
            if reply is not None:
                self.store.commit(reply=reply)  # the reply alone: nothing to change
            return 0
        slots: list[tuple[int, str | None]] = [(self._index[i], None) for i in ids]
        drop = self._dead_blocks({s for s, _ in slots})
        self.store.commit(slots=slots, drop_blocks=drop, **with_reply(reply))
        for key in [k for k in self._cache if k[0] in drop]:
            del self._cache[key]
        for i in ids:
            del self._index[i]
        return len(ids)

    # --------------------------------------------------------------- queries
    def verify(self, identity: str, probe: bytes) -> bytes:
        """Encrypted similarities of ``probe`` against the identity's pack (one SEAL
        ciphertext; the edge reads the identity's score, or every live slot's).

        Raises:
            UnknownIdentityError: not enrolled.
            DecodeError / KeyMismatchError: bad probe.
        """
        return finish_verify(self.pub, self.prepare_verify(identity, probe))

    def prepare_verify(self, identity: str, probe: bytes) -> PackJob:
        """What :func:`finish_verify` needs for one verify: the identity's pack, a copy
        taken under the gallery's lock, and the probe's ciphertext (not yet loaded).

        Raises:
            UnknownIdentityError: not enrolled.
            DecodeError / KeyMismatchError: the probe's envelope is malformed or for
                another key (the ciphertext itself is checked by :func:`finish_verify`).
        """
        obj = decode(probe, self.pub, "probe-verify", DecodeError)
        N = self.params.n
        with self._lock:
            slot = self._index.get(identity)
            if slot is None:
                raise UnknownIdentityError(f"identity {identity!r} is not enrolled at this site")
            b, o = divmod(slot, N)
            group = o // self.per_pack
            template = self._block("pack", b)[group].copy()
            first = b * N + group * self.per_pack
            live = tuple(
                s < len(self.store.slots) and self.store.slots[s] is not None
                for s in range(first, first + self.per_pack)
            )
        return PackJob(template=template, probe=obj.get("ct"), pos=o % self.per_pack, live=live)

    def quota_scope(self, identity: str) -> str:
        """What a verify of ``identity`` reveals, for the cloud's quotas: its pack (the
        result carries every live template of it); ``"?"`` when not enrolled."""
        with self._lock:
            slot = self._index.get(identity)
        return "?" if slot is None else f"{self.key_id} pack {slot // self.per_pack}"

    def verify_many(
        self, items: Sequence[tuple[str, bytes]], *, compute: Compute | None = None
    ) -> list[bytes | Exception]:
        """:meth:`verify` for a batch of ``(identity, probe)``; one bad item fails alone.

        Args:
            items: the verifies.
            compute: runs :func:`finish_verify` over a list of jobs, e.g. in worker
                processes the cloud agent keeps; None runs it here.

        Returns:
            Per item, the result bytes or the exception :meth:`verify` would raise.
        """
        out: list[bytes | Exception] = []
        jobs: list[PackJob] = []
        for identity, probe in items:
            try:
                jobs.append(self.prepare_verify(identity, probe))
                out.append(b"")  # filled in below
            except Exception as exc:  # per item, as verify() would raise it
                out.append(exc)
        done = iter((compute or finish_many_verify)(self.pub, jobs))
        return [next(done) if isinstance(o, bytes) else o for o in out]

    def identify(
        self, probe: bytes, *, rerandomise: Rerandomise | None = None
    ) -> tuple[bytes, int]:
        """Encrypted similarities against every slot (free/deleted slots: erased).

        Args:
            probe: the edge's identify probe (``d`` ciphertexts).
            rerandomise: re-randomises the probe's ciphertexts, e.g. in worker
                processes the cloud agent keeps; None does it here
                (:func:`~cipherface.crypto.ckks.rerandomise_many`).

        Returns:
            ``(result bytes, slot count)``; the count equals ``len(self.ids())``.

        Raises:
            DecodeError / KeyMismatchError: bad probe.
        """
        obj = decode(probe, self.pub, "probe-identify", DecodeError)
        with self.pub.zeros.busy():
            return self._identify(obj, rerandomise)

    def _identify(
        self, obj: dict[str, object], rerandomise: Rerandomise | None
    ) -> tuple[bytes, int]:
        what = "probe-identify"
        cts = self._ciphertexts(obj.get("cts"), self.dim, what)
        p = (rerandomise or rerandomise_many)(self.pub, cts, what).astype(np.uint32, copy=False)
        if p.shape != (self.dim, 2, self.ring.k, self.params.n):  # a caller's function
            raise RuntimeError(f"{what}: re-randomised to shape {p.shape}")
        with self._lock:
            live_blocks = self._live_blocks()
            blocks = [self._block("col", b) for b in live_blocks]
            slots = self._ids_locked()
        N = self.params.n
        live = np.array([s is not None for s in slots], dtype=bool).reshape(len(blocks), N)
        results: list[bytes] = []
        for first in range(0, len(blocks), IDENTIFY_BATCH):
            # Products of a batch of blocks, then one flood + rescale over all of them (the
            # parallel transforms pay their start-up once per batch, not per block).
            chunk = range(first, min(first + IDENTIFY_BATCH, len(blocks)))
            prods = np.stack([mac(blocks[b], p, self.ring.q) for b in chunk])
            results += finish_many(self.pub, prods, live[chunk.start : chunk.stop])
        body = {**header(self.pub, "result-identify"), "count": len(slots), "blocks": results}
        return cast(bytes, msgpack.packb(body, use_bin_type=True)), len(slots)

    def close(self) -> None:
        self.store.close()


__all__ = ["CkksGallery", "mac"]
