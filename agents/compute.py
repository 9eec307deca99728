"""Worker processes for the cloud's SEAL work: both cores, not one GIL.

SEAL (``tenseal.sealapi``) holds the GIL, so the cloud agent's threads take turns on
it. A :class:`ComputePool` runs, in ``workers`` processes,

* a verify's compute (~2 ms of SEAL and numpy: load the probe, re-randomise it with
  a fresh public-key encryption of zero, product, flood, rescale, serialize) --
  :func:`cipherface.crypto.ckks.finish_verify`, one job per verify;
* an identify probe's re-randomisation (its ``d`` = 128 ciphertexts, ~0.25 s of SEAL
  in one process: load, check, add a fresh encryption of zero, read the residues) --
  :func:`cipherface.crypto.ckks.rerandomise_many` in chunks of
  :data:`RERANDOMISE_CHUNK` ciphertexts, spread over the idle workers. The 1:N
  kernel then runs in the agent (numba, both cores, without the GIL).

Everything else stays in the agent: the broker session, decoding, the reply cache,
the gallery (only the agent reads or writes it: a worker gets one pack, 64 KB, per
verify job, and probe ciphertexts) and the acknowledgements. Each worker keeps its
own encryptions of zero (:class:`~cipherface.crypto.ckks.ZeroPool`, made with its
own SEAL randomness) and uses each once; it makes none ahead while the agent holds
them (:meth:`ComputePool.holding`, around an identify: the 1:N kernel wants the cores).

The worker's side and the wire (msgpack frames over a pipe, never pickle) are in
:mod:`cipherface.agents.compute_worker`.

A worker that dies (even ``kill -9``), stops answering or reading (SIGSTOP: sends give
up after the job timeout too) or answers garbage only costs time: the jobs it held
are computed in the agent's own process instead, and a new worker is started
in the background; a watcher thread replaces a worker that dies while idle, so
:meth:`ComputePool.levels` (the cloud's metrics) sees it at once. Nothing was
acknowledged to the broker for those requests yet, and the reply cache makes a
retried request id harmless, so nothing is lost.
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
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from cipherface import errors
from cipherface.agents.compute_worker import (
    MAX_KEYS,
    OP_RERANDOMISE,
    OP_VERIFY,
    READY,
    worker_main,
)
from cipherface.crypto.ckks import (
    CkksPublic,
    PackJob,
    finish_many_verify,
    rerandomise_many,
)
from cipherface.crypto.keyfile import key_file_bytes

log = logging.getLogger(__name__)

#: Seconds a worker may take over one batch before it is given up (killed, replaced).
JOB_TIMEOUT_S: Final = 30.0
#: Seconds to wait for a new worker to import its modules and say it is ready.
START_TIMEOUT_S: Final = 120.0
#: Identify probe ciphertexts per worker request (~10 ms of SEAL): small enough that a
#: verify waits at most about that long for a worker an identify holds.
RERANDOMISE_CHUNK: Final = 8
WATCH_S: Final = 0.5  # how often the watcher looks for workers that died while idle

U32 = npt.NDArray[np.uint32]


# ------------------------------------------------------------------- agent side
class _Worker:
    """One worker process and the agent's end of its pipe."""

    def __init__(self, ctx: Any, number: int, hold: Any) -> None:
        self.number = number
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, hold),
            name=f"cipherface-compute-{number}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        # Key ids whose public key the worker holds, least recently used first: the
        # worker evicts in the same order, so both sides agree on what it has.
        self.keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: True while a caller holds it (only the holder touches its pipe then).
        self.held = False

    def use_key(self, kid: str) -> bool:
        """Note a use of ``kid``; True if the worker still holds its public key."""
        held = self.keys.pop(kid, False) is None
        self.keys[kid] = None
        while len(self.keys) > MAX_KEYS:
            self.keys.popitem(last=False)
        return held

    def wait_ready(self, timeout: float) -> bool:
        try:
            return self.conn.poll(timeout) and self.conn.recv_bytes() == READY
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
    """``workers`` processes computing verify results and re-randomising identify probes.

    Thread-safe: a verify takes one idle worker (waiting if none is idle), plus any
    other idle ones, and splits its jobs between them; it never waits for a second
    worker while holding one, so callers cannot deadlock each other. An identify
    hands its probe out in chunks, one chunk per worker at a time; while a verify
    waits for a worker the identify keeps only one chunk in flight, so verifies
    wait at most about one chunk (:data:`RERANDOMISE_CHUNK`).

    Args:
        workers: processes to run (at least 1).
        job_timeout: seconds a worker may take over one batch before it is replaced.
        start_timeout: seconds to wait for each worker to start.

    Raises:
        InvalidArgumentError: ``workers`` < 1.
        LocalError: a worker did not start.
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
        #: ``restarts``: workers replaced; ``jobs``: verifies; ``local``: verifies computed
        #: in this process because a worker failed or none was free; ``ciphertexts``
        #: and ``ciphertexts_local``: the same for identify probe ciphertexts.
        self.stats = {
            "restarts": 0,
            "local": 0,
            "jobs": 0,
            "ciphertexts": 0,
            "ciphertexts_local": 0,
        }
        self._ctx = multiprocessing.get_context("spawn")
        # Shared with every worker (multiprocessing's own shared memory, not a message):
        # above 0 while this process runs an identify (see holding()).
        self._hold = self._ctx.RawValue("i", 0)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive: dict[int, _Worker] = {}
        self._closed = False
        self._next = 0
        self._waiting = 0  # verifies waiting for a worker (an identify then holds back)
        started = [self._spawn() for _ in range(workers)]
        for w in started:
            if w.wait_ready(start_timeout):
                self._add(w)
            else:
                for other in started:
                    other.kill()
                raise errors.LocalError(f"compute worker {w.number} did not start")
        self._watcher = threading.Thread(target=self._watch, name="compute-watch", daemon=True)
        self._watcher.start()

    # -------------------------------------------------------------- lifecycle
    def _spawn(self) -> _Worker:
        with self._lock:
            self._next += 1
            number = self._next
        return _Worker(self._ctx, number, self._hold)

    def _add(self, w: _Worker) -> None:
        with self._lock:
            if self._closed:
                w.kill()
                return
            self._alive[w.number] = w
        self._idle.put(w)

    def _retire(self, dead: _Worker, why: str, *, holder: bool = True) -> bool:
        """Drop a failed worker and start its successor in the background.

        Only its holder (``holder``) or, for a worker nobody holds, the watcher may
        retire it: then nobody else is using its pipe. False if that is not so, or it
        was retired already.
        """
        with self._lock:
            if self._alive.get(dead.number) is not dead or (dead.held and not holder):
                return False
            del self._alive[dead.number]
            closed = self._closed
            if not closed:
                self.stats["restarts"] += 1
        log.warning("compute worker %d (pid %s) %s: replacing it", dead.number, dead.proc.pid, why)
        dead.kill()
        if closed:
            return True

        def restart() -> None:
            w = self._spawn()
            if w.wait_ready(self.start_timeout):
                self._add(w)
            else:
                w.kill()
                log.error("a replacement compute worker did not start")

        threading.Thread(target=restart, name="compute-restart", daemon=True).start()
        return True

    def _watch(self) -> None:
        """Replace workers that die while idle (a held one is replaced by its holder)."""
        while True:
            with self._lock:
                if self._closed:
                    return
                workers = {w.proc.sentinel: w for w in self._alive.values()}
            if not workers:
                time.sleep(WATCH_S)
                continue
            ended = multiprocessing.connection.wait(list(workers), timeout=WATCH_S)
            for sentinel in ended:
                w = workers[sentinel]
                if not self._retire(w, f"exited (code {w.proc.exitcode})", holder=False):
                    time.sleep(0.05)  # its holder will see it: do not spin meanwhile

    def pids(self) -> list[int]:
        """Process ids of the workers that are running (tests, metrics)."""
        with self._lock:
            workers = list(self._alive.values())
        return [w.proc.pid for w in workers if w.proc.pid is not None and w.proc.is_alive()]

    def levels(self) -> dict[str, int]:
        """Workers alive now, plus a copy of :attr:`stats` (for metrics and health)."""
        alive = len(self.pids())
        with self._lock:
            return {"alive": alive, **self.stats}

    def wait_workers(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` workers run (a dead one is replaced in the background)."""
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

    # ---------------------------------------------------------- taking workers
    def _count(self, what: str, n: int) -> None:
        with self._lock:
            self.stats[what] += n

    def _claim(self, w: _Worker) -> bool:
        with self._lock:
            if self._alive.get(w.number) is not w:
                return False  # retired while idle: drop it
            w.held = True
            return True

    def _release(self, w: _Worker) -> None:
        with self._lock:
            w.held = False
        self._idle.put(w)

    def _get(self, timeout: float | None, *, verify: bool = False) -> _Worker | None:
        """An idle worker; ``timeout`` None: only if one is idle now. A verify that
        waits is counted (an identify then leaves idle workers to it)."""
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            with self._lock:
                if self._closed or not self._alive:
                    return None  # none running (being replaced): do not wait for one
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if timeout is None or left <= 0:
                    return None
                if verify:
                    with self._lock:
                        self._waiting += 1
                try:
                    # Short waits: a successor joins the queue, and _alive may empty.
                    w = self._idle.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                finally:
                    if verify:
                        with self._lock:
                            self._waiting -= 1
            if self._claim(w):
                return w

    def _take(self, want: int) -> list[_Worker]:
        """One worker (waiting for it), plus up to ``want - 1`` more that are idle now."""
        first = self._get(self.job_timeout, verify=True)
        if first is None:
            return []
        got = [first]
        while len(got) < want:
            w = self._get(None)
            if w is None:
                break
            got.append(w)
        return got

    def _send(self, w: _Worker, pub: CkksPublic, op: str, body: list[Any]) -> bool:
        kid = pub.key_id
        key_file = None if w.use_key(kid) else key_file_bytes(pub.key_file())
        frame = msgpack.packb([op, kid, key_file, body], use_bin_type=True)
        try:
            sent = _write_frame(w.conn, frame, self.job_timeout)
        except (OSError, ValueError) as exc:
            self._retire(w, f"refused a request ({exc})")
            return False
        if not sent:  # stopped or hung: it reads nothing, and a blocking send never returns
            self._retire(w, f"took no request within {self.job_timeout:g} s")
        return sent

    def _reply(self, w: _Worker, *, wait: bool) -> Any:
        """The worker's reply frame, decoded; None (worker retired) if it failed."""
        try:
            if wait and not w.conn.poll(self.job_timeout):
                self._retire(w, f"did not answer within {self.job_timeout:g} s")
                return None
            frame = w.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            self._retire(w, f"died ({type(exc).__name__})")
            return None
        try:
            return msgpack.unpackb(frame, raw=False)
        except Exception:  # whatever a broken worker sends must not reach the caller
            self._retire(w, "answered out of step")
            return None

    # ----------------------------------------------------------------- verify
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
            self._release(w)
        sent = [
            self._send(w, pub, OP_VERIFY, [_encode_job(j) for j in chunk])
            for w, chunk in zip(workers, chunks)
        ]
        out: list[bytes | Exception] = []
        for w, chunk, ok in zip(workers, chunks, sent):
            got = self._receive_verify(w, len(chunk)) if ok else None
            if got is None:
                self._count("local", len(chunk))
                got = finish_many_verify(pub, chunk)
            out += got
        return out

    def _receive_verify(self, w: _Worker, count: int) -> list[bytes | Exception] | None:
        """The worker's results, or None (it failed, and is being replaced)."""
        reply = self._reply(w, wait=True)
        if reply is None:
            return None
        try:
            got = _decode_reply(reply, count)
        except Exception:  # whatever a broken worker sends must not reach the caller
            got = None
        if got is None:
            self._retire(w, "answered out of step")
            return None
        self._release(w)
        return got

    # ------------------------------------------------------------- identify
    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """No worker makes encryptions of zero ahead while this is held: wrap an
        identify (:meth:`rerandomise`, then the 1:N kernel here, which wants every core)."""
        with self._lock:
            self._hold.value += 1
        try:
            yield
        finally:
            with self._lock:
                self._hold.value -= 1

    def rerandomise(self, pub: CkksPublic, cts: Sequence[object], what: str) -> U32:
        """:func:`~cipherface.crypto.ckks.rerandomise_many` of an identify probe, in the
        workers (chunks of :data:`RERANDOMISE_CHUNK`, as many workers as are idle).

        Matches :data:`cipherface.crypto.ckks.Rerandomise`. A chunk whose worker fails,
        or that finds no worker running, is re-randomised in this process.

        Returns:
            ``(len(cts), 2, k, N)`` residues (uint32).

        Raises:
            DecodeError: the first ciphertext (in order) that is not one of this key's,
                as in process.
        """
        k, n = len(pub.params.data_primes), pub.params.n
        chunks = [
            list(cts[i : i + RERANDOMISE_CHUNK]) for i in range(0, len(cts), RERANDOMISE_CHUNK)
        ]
        if not chunks:
            return np.empty((0, 2, k, n), dtype=np.uint32)
        self._count("ciphertexts", len(cts))
        out: list[U32 | None] = [None] * len(chunks)
        failed: dict[int, Exception] = {}
        todo = collections.deque(range(len(chunks)))
        busy: dict[Any, tuple[_Worker, int]] = {}  # by pipe

        def here(i: int) -> None:
            self._count("ciphertexts_local", len(chunks[i]))
            try:
                out[i] = rerandomise_many(pub, chunks[i], what).astype(np.uint32)
            except Exception as exc:
                failed[i] = exc

        while todo or busy:
            if failed:
                todo.clear()  # the identify fails: send nothing more, collect what is out
            while todo:
                # With nothing in flight, wait for a worker; otherwise only take idle
                # ones, and none while a verify waits for one.
                if busy and self._waiting:
                    break
                w = self._get(None if busy else self.job_timeout)
                if w is None:
                    break
                i = todo.popleft()
                if self._send(w, pub, OP_RERANDOMISE, [what, chunks[i]]):
                    busy[w.conn] = (w, i)
                else:
                    here(i)
            if not busy:
                if todo:
                    here(todo.popleft())  # no worker running or free: one chunk here
                continue
            ready = multiprocessing.connection.wait(list(busy), timeout=self.job_timeout)
            if not ready:
                for w, i in busy.values():
                    self._retire(w, f"did not answer within {self.job_timeout:g} s")
                    here(i)
                busy.clear()
            for conn in ready:
                w, i = busy.pop(conn)
                got = self._receive_residues(w, len(chunks[i]), k, n)
                if got is None:
                    here(i)
                elif isinstance(got, Exception):
                    failed[i] = got
                else:
                    out[i] = got
        if failed:
            raise failed[min(failed)]
        return np.concatenate([o for o in out if o is not None])

    def _receive_residues(self, w: _Worker, count: int, k: int, n: int) -> U32 | Exception | None:
        """The chunk's residues, or the worker's error for it; None (the worker failed
        and is being replaced: the chunk is done here)."""
        reply = self._reply(w, wait=False)
        if reply is None:
            return None
        got: U32 | Exception | None = None
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == 0:
            data = reply[1]
            if isinstance(data, bytes) and len(data) == count * 2 * k * n * 4:
                got = np.frombuffer(data, dtype="<u4").reshape(count, 2, k, n)
        elif isinstance(reply, list) and len(reply) == 3 and reply[0] == 1:
            if isinstance(reply[1], str) and isinstance(reply[2], str):
                got = _error_of(reply[1], reply[2])
        if got is None:
            self._retire(w, "answered out of step")
            return None
        self._release(w)
        return got


__all__ = ["JOB_TIMEOUT_S", "RERANDOMISE_CHUNK", "ComputePool", "worker_main"]
