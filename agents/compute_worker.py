"""The compute worker process: its loop and the wire it speaks with the agent.

A worker (started by :class:`cipherface.agents.compute.ComputePool` with ``spawn``)
answers one msgpack frame with one msgpack frame over a :mod:`multiprocessing` pipe
(never pickle). A request is ``[op, key id, key file or nil, body]``: the site's
public key file goes once per worker and key (the agent tracks which ones a worker
holds, in the same least-recently-used order); for ``verify`` the body is per job
the pack's residues, the probe's ciphertext, the position and the live mask, and
the reply per job ``[0, result bytes]`` or ``[1, error class name, message]``; for
``rerandomise`` the body is ``[what, ciphertexts]`` and the reply ``[0, residues]``
(little-endian uint32) of all of them, or the first error. A frame the worker cannot
read gets an empty reply: out of step, the agent replaces the worker.
"""

from __future__ import annotations

import collections
import multiprocessing.connection
import signal
from typing import Any, Final

import msgpack
import numpy as np

from cipherface import errors
from cipherface.crypto.ckks import (
    CkksKeys,
    CkksPublic,
    PackJob,
    finish_many_verify,
    hold_fills,
    rerandomise_many,
)

MAX_KEYS: Final = 8  # public keys a worker keeps loaded (most recently used)
OP_VERIFY: Final = "verify"
OP_RERANDOMISE: Final = "rerandomise"
READY: Final = b"ready"  # a new worker's first frame: imports done, serving


def _error(exc: Exception) -> list[Any]:
    return [1, type(exc).__name__, str(exc)]


def answer(frame: bytes, keys: collections.OrderedDict[str, CkksPublic]) -> bytes:
    """One request frame -> its reply frame (``keys``: the public keys held, LRU)."""
    try:
        op, kid, key_file, body = msgpack.unpackb(frame, raw=False)
    except Exception:  # not our frame: an empty reply is out of step, and we are replaced
        return bytes(msgpack.packb([], use_bin_type=True))
    reply: Any
    try:
        # Same least-recently-used order as the agent's copy (_Worker.use_key).
        pub = keys.pop(kid, None)
        if pub is None:
            if key_file is None:
                raise errors.LocalError("compute worker: key not loaded")
            pub = CkksKeys.from_public_bytes(key_file).public
        keys[kid] = pub
        while len(keys) > MAX_KEYS:
            keys.popitem(last=False)
        if op == OP_VERIFY:
            jobs = [_job(pub, *raw) for raw in body]
            reply = [
                _error(r) if isinstance(r, Exception) else [0, r]
                for r in finish_many_verify(pub, jobs)
            ]
        elif op == OP_RERANDOMISE:
            what, cts = body
            # Each ciphertext: SEAL load + checks, a fresh encryption of zero of this
            # process's own pool (used once), residues read back.
            got = rerandomise_many(pub, cts, str(what))
            reply = [0, np.ascontiguousarray(got, dtype="<u4").tobytes()]
        else:
            raise errors.LocalError(f"compute worker: unknown operation {op!r}")
    except Exception as exc:  # the whole request fails, the worker lives on
        reply = [_error(exc) for _ in body] if op == OP_VERIFY else _error(exc)
    return bytes(msgpack.packb(reply, use_bin_type=True))


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """A worker's loop: one request frame in, one reply frame out, until EOF."""
    keys: collections.OrderedDict[str, CkksPublic] = collections.OrderedDict()
    conn.send_bytes(READY)
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the agent closed the pipe or died: nothing left to serve
        conn.send_bytes(answer(frame, keys))


def _job(pub: CkksPublic, template: bytes, probe: object, pos: int, live: bytes) -> PackJob:
    k, n = len(pub.params.data_primes), pub.params.n
    return PackJob(
        template=np.frombuffer(template, dtype="<u4").reshape(2, k, n),
        probe=probe,
        pos=pos,
        live=tuple(bool(b) for b in live),
    )


def worker_main(conn: multiprocessing.connection.Connection, hold: Any = None) -> None:
    """Entry point of a worker process (started with ``spawn``: no inherited threads,
    no copy of the agent's random state).

    Args:
        conn: the worker's end of the pipe.
        hold: a shared integer the agent keeps above 0 while it runs an identify's
            kernel: the worker makes no encryptions of zero ahead meanwhile.
    """
    # Ctrl-C reaches the whole process group: the agent decides when workers end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hold is not None:
        hold_fills(lambda: hold.value > 0)
    try:
        _serve(conn)
    finally:
        conn.close()


__all__ = ["MAX_KEYS", "OP_RERANDOMISE", "OP_VERIFY", "READY", "answer", "worker_main"]
