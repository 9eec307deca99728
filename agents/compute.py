"""Worker processes for the cloud's verify compute: both cores, not one GIL.

SEAL (``tenseal.sealapi``) holds the GIL, so the cloud agent's threads take turns on
the ~2 ms of SEAL and numpy work a verify costs (load the probe, re-randomise it with
a fresh public-key encryption of zero, product, flood, rescale, serialize). A
:class:`ComputePool` runs that part -- :func:`cipherface.crypto.ckks.finish_verify` --
in ``workers`` processes; everything else stays in the agent: the broker session,
decoding, the reply cache, the gallery (only the agent reads or writes it: a worker
gets one pack, 64 KB, per job) and the acknowledgements.

Wire between the agent and a worker: a :mod:`multiprocessing` pipe carrying msgpack
frames (``send_bytes`` / ``recv_bytes``; never pickle). A request holds the site's
public key file once per worker and key, then per job the pack's residues, the
probe's ciphertext, the position and the live mask; the reply holds per job the
result bytes or the error's class name and message.

A worker that dies (even ``kill -9``) or stops answering only costs time: the jobs it
held are computed in the agent's own process instead, and a new worker is started
in the background. Nothing was acknowledged to the broker for those requests yet,
and the reply cache makes a retried request id harmless, so nothing is lost.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import select
import signal
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

import msgpack
import numpy as np

from cipherface import errors
from cipherface.crypto.ckks import CkksKeys, CkksPublic, PackJob, finish_many_verify
from cipherface.crypto.keyfile import key_file_bytes

log = logging.getLogger(__name__)

#: Seconds a worker may take over one batch before it is given up (killed, replaced).
JOB_TIMEOUT_S: Final = 30.0
#: Seconds to wait for a new worker to import its modules and say it is ready.
START_TIMEOUT_S: Final = 120.0
MAX_KEYS: Final = 8  # public keys a worker keeps loaded (most recently used)
_READY: Final = b"ready"


# ------------------------------------------------------------------ worker side
def _error(exc: Exception) -> list[Any]:
    return [1, type(exc).__name__, str(exc)]


def _answer(frame: bytes, keys: collections.OrderedDict[str, CkksPublic]) -> bytes:
    """One request frame -> its reply frame (``keys``: the public keys held, LRU)."""
    try:
        kid, key_file, raw_jobs = msgpack.unpackb(frame, raw=False)
    except Exception:  # not our frame: an empty reply is out of step, and we are replaced
        return bytes(msgpack.packb([], use_bin_type=True))
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
        jobs = [_job(pub, *raw) for raw in raw_jobs]
        reply = [
            _error(r) if isinstance(r, Exception) else [0, r] for r in finish_many_verify(pub, jobs)
        ]
    except Exception as exc:  # the whole batch fails, the worker lives on
        reply = [_error(exc) for _ in raw_jobs]
    return bytes(msgpack.packb(reply, use_bin_type=True))


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """A worker's loop: one request frame in, one reply frame out, until EOF."""
    keys: collections.OrderedDict[str, CkksPublic] = collections.OrderedDict()
    conn.send_bytes(_READY)
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the agent closed the pipe or died: nothing left to serve
        conn.send_bytes(_answer(frame, keys))


def _job(pub: CkksPublic, template: bytes, probe: object, pos: int, live: bytes) -> PackJob:
    k, n = len(pub.params.data_primes), pub.params.n
    return PackJob(
        template=np.frombuffer(template, dtype="<u4").reshape(2, k, n),
        probe=probe,
        pos=pos,
        live=tuple(bool(b) for b in live),
    )


def worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process (started with ``spawn``: no inherited threads)."""
    # Ctrl-C reaches the whole process group: the agent decides when workers end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(conn)
    finally:
        conn.close()


# ------------------------------------------------------------------- agent side
class _Worker:
    """One worker process and the agent's end of its pipe."""

    def __init__(self, ctx: Any, number: int) -> None:
        self.number = number
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main, args=(child,), name=f"cipherface-compute-{number}", daemon=True
        )
        self.proc.start()
        child.close()
        # Key ids whose public key the worker holds, least recently used first: the
        # worker evicts in the same order, so both sides agree on what it has.
        self.keys: collections.OrderedDict[str, None] = collections.OrderedDict()

    def use_key(self, kid: str) -> bool:
        """Note a use of ``kid``; True if the worker still holds its public key."""
        held = self.keys.pop(kid, False) is None
        self.keys[kid] = None
        while len(self.keys) > MAX_KEYS:
            self.keys.popitem(last=False)
        return held

    def wait_ready(self, timeout: float) -> bool:
        try:
            return self.conn.poll(timeout) and self.conn.recv_bytes() == _READY
        except (EOFError, OSError):
            return False

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


#: Bytes per write to a worker's pipe (Linux reports a Unix socket writable only while
#: three quarters of its send buffer, ~200 KB, are free: such a write never blocks).
_WRITE_CHUNK: Final = 32 * 1024


def _write_frame(conn: multiprocessing.connection.Connection, data: bytes, timeout: float) -> bool:
    """``conn.send_bytes(data)`` that gives up after ``timeout`` seconds (False).

    A batch is larger than the pipe's buffer, so a plain send to a worker that is
    stopped (SIGSTOP) or hung blocks for good, holding its caller and the jobs. This
    writes :mod:`multiprocessing.connection`'s framing (a 4-byte big-endian length,
    then the bytes) in chunks, each once the pipe has room; a frame cut short leaves
    the pipe out of step, so the caller must replace the worker on False.
    """
    if len(data) > 0x7FFFFFFF:  # the 4-byte header's limit (a batch is a few MB at most)
        raise ValueError(f"a {len(data)}-byte batch frame")
    view = memoryview(struct.pack("!i", len(data)) + data)
    fd = conn.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for _, events in poller.poll(left * 1000):
            if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                raise BrokenPipeError("the worker's end of the pipe is closed")
            view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
    return True


def _encode_job(job: PackJob) -> list[Any]:
    return [
        np.ascontiguousarray(job.template, dtype="<u4").tobytes(),
        job.probe,
        job.pos,
        bytes(bytearray(job.live)),
    ]


def _decode_reply(reply: Any, count: int) -> list[bytes | Exception] | None:
    """A worker's reply as one result or error per job; None when it is not ``count``
    well-formed items (the worker is then out of step and replaced)."""
    if not isinstance(reply, list) or len(reply) != count:
        return None
    out: list[bytes | Exception] = []
    for item in reply:
        if not isinstance(item, list) or not item or item[0] not in (0, 1):
            return None
        if item[0] == 0:
            if len(item) != 2 or not isinstance(item[1], bytes):
                return None
            out.append(item[1])
            continue
        if len(item) != 3 or not all(isinstance(x, str) for x in item[1:]):
            return None
        exc = _error_of(item[1], item[2])
        if exc is None:
            return None
        out.append(exc)
    return out


def _error_of(name: str, message: str) -> Exception | None:
    """The agent-side exception for a worker's error: the same class when it is one of
    ours (what :func:`finish_verify` raises), a plain one (an internal error) for any
    other name; None for one of ours that needs more than a message, which no worker
    raises (that worker is broken: its jobs are computed again in the agent)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.CipherFaceError):
        try:
            return cls(message)
        except TypeError:
            return None
    return RuntimeError(f"compute worker: {name}: {message}")


class ComputePool:
    """``workers`` processes computing verify results (:func:`finish_verify`).

    Thread-safe: each caller takes one idle worker (waiting if none is idle), plus any
    other idle ones, and splits its jobs between them; it never waits for a second
    worker while holding one, so callers cannot deadlock each other.

    Args:
        workers: processes to run (at least 1).
        job_timeout: seconds a worker may take over one batch before it is replaced.
        start_timeout: seconds to wait for each worker to start.

    Raises:
        InvalidArgumentError: ``workers`` < 1.
    """

    def __init__(
        self,
        workers: int,
        *,
        job_timeout: float = JOB_TIMEOUT_S,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        if workers < 1:
            raise errors.InvalidArgumentError("a compute pool needs at least one worker")
        self.size = workers
        self.job_timeout = job_timeout
        self.start_timeout = start_timeout
        #: ``restarts``: workers replaced; ``local``: jobs computed in this process
        #: because a worker failed or none was running.
        self.stats = {"restarts": 0, "local": 0, "jobs": 0}
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive: dict[int, _Worker] = {}
        self._closed = False
        self._next = 0
        started = [self._spawn() for _ in range(workers)]
        for w in started:
            if w.wait_ready(start_timeout):
                self._add(w)
            else:
                w.kill()
                raise errors.LocalError(f"compute worker {w.number} did not start")

    # -------------------------------------------------------------- lifecycle
    def _spawn(self) -> _Worker:
        with self._lock:
            self._next += 1
            number = self._next
        return _Worker(self._ctx, number)

    def _add(self, w: _Worker) -> None:
        with self._lock:
            if self._closed:
                w.kill()
                return
            self._alive[w.number] = w
        self._idle.put(w)

    def _replace(self, dead: _Worker, why: str) -> None:
        """Drop a failed worker and start its successor in the background."""
        log.warning("compute worker %d (pid %s) %s: replacing it", dead.number, dead.proc.pid, why)
        dead.kill()
        with self._lock:
            self._alive.pop(dead.number, None)
            if self._closed:
                return
            self.stats["restarts"] += 1

        def restart() -> None:
            w = self._spawn()
            if w.wait_ready(self.start_timeout):
                self._add(w)
            else:
                w.kill()
                log.error("a replacement compute worker did not start")

        threading.Thread(target=restart, name="compute-restart", daemon=True).start()

    def pids(self) -> list[int]:
        """Process ids of the workers that are running (tests, metrics)."""
        with self._lock:
            workers = list(self._alive.values())
        return [w.proc.pid for w in workers if w.proc.pid is not None and w.proc.is_alive()]

    def wait_workers(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` workers run (a dead one is replaced when next used)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.pids()) >= count:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """End every worker (closing its pipe ends it; stragglers are killed)."""
        with self._lock:
            self._closed = True
            workers = list(self._alive.values())
            self._alive.clear()
        for w in workers:
            with contextlib.suppress(OSError):
                w.conn.close()
        for w in workers:
            w.proc.join(5)
            w.kill()

    def __enter__(self) -> ComputePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ work
    def _count(self, what: str, n: int) -> None:
        with self._lock:
            self.stats[what] += n

    def _take(self, want: int) -> list[_Worker]:
        """One worker (waiting for it), plus up to ``want - 1`` more that are idle now."""
        with self._lock:
            if self._closed or not self._alive:
                return []  # none running (being replaced): do not wait for one
        try:
            first = self._idle.get(timeout=self.job_timeout)
        except queue.Empty:
            return []
        got = [first]
        while len(got) < want:
            try:
                got.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return got

    def verify(self, pub: CkksPublic, jobs: Sequence[PackJob]) -> list[bytes | Exception]:
        """:func:`finish_verify` of each job, in the workers; one bad job fails alone.

        Matches :data:`cipherface.crypto.ckks.Compute`. Jobs of a worker that fails are
        computed in this process.
        """
        if not jobs:
            return []
        self._count("jobs", len(jobs))
        workers = self._take(len(jobs))
        if not workers:
            self._count("local", len(jobs))
            return finish_many_verify(pub, jobs)
        share = -(-len(jobs) // len(workers))
        chunks = [list(jobs[i : i + share]) for i in range(0, len(jobs), share)]
        workers, spare = workers[: len(chunks)], workers[len(chunks) :]
        for w in spare:
            self._idle.put(w)
        sent = [self._send(w, pub, chunk) for w, chunk in zip(workers, chunks)]
        out: list[bytes | Exception] = []
        for w, chunk, ok in zip(workers, chunks, sent):
            got = self._receive(w, len(chunk)) if ok else None
            if got is None:
                self._count("local", len(chunk))
                got = finish_many_verify(pub, chunk)
            out += got
        return out

    def _send(self, w: _Worker, pub: CkksPublic, chunk: list[PackJob]) -> bool:
        kid = pub.key_id
        key_file = None if w.use_key(kid) else key_file_bytes(pub.key_file())
        frame = msgpack.packb([kid, key_file, [_encode_job(j) for j in chunk]], use_bin_type=True)
        try:
            sent = _write_frame(w.conn, frame, self.job_timeout)
        except (OSError, ValueError) as exc:
            self._replace(w, f"refused a batch ({exc})")
            return False
        if not sent:  # stopped or hung: it reads nothing, and a blocking send never returns
            self._replace(w, f"took no batch within {self.job_timeout:g} s")
        return sent

    def _receive(self, w: _Worker, count: int) -> list[bytes | Exception] | None:
        """The worker's results, or None (it failed, and is being replaced)."""
        try:
            if not w.conn.poll(self.job_timeout):
                self._replace(w, f"did not answer within {self.job_timeout:g} s")
                return None
            frame = w.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            self._replace(w, f"died ({type(exc).__name__})")
            return None
        try:
            got = _decode_reply(msgpack.unpackb(frame, raw=False), count)
        except Exception:  # whatever a broken worker sends must not reach the caller
            got = None
        if got is None:
            self._replace(w, "answered out of step")
            return None
        self._idle.put(w)
        return got


__all__ = ["JOB_TIMEOUT_S", "ComputePool", "worker_main"]
