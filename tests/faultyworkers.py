"""Compute workers that misbehave once, for tests/test_compute_faults.py.

A test points :data:`cipherface.agents.compute.worker_main` at :func:`main` and picks
the fault with ``CF_FAULTY_WORKER`` (spawned workers inherit the environment). The
first batch of the test is computed honestly and its reply then spoiled the way the
mode says; every other batch, and every replacement worker, is served like a real one.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any

import msgpack

from cipherface.agents import compute_worker
from cipherface.crypto.ckks import hold_fills


def _spoil(mode: str, reply: bytes, conn: Any) -> bytes:
    """The reply to send instead of ``reply``."""
    items = msgpack.unpackb(reply, raw=False)
    if mode == "garbage-items":  # the right count, nothing a result can be made of
        return msgpack.packb([[0, 12345]] + [None] * (len(items) - 1), use_bin_type=True)
    if mode == "odd-error":  # an error class that needs other arguments
        return msgpack.packb([[1, "PeerReportedError", "x"]] * len(items), use_bin_type=True)
    if mode == "one-more":
        return msgpack.packb([*items, items[0]], use_bin_type=True)
    if mode == "not-msgpack":
        return b"\xc1\xc1 not msgpack"
    if mode == "sigstop":  # stopped while holding the batch (never continued)
        os.kill(os.getpid(), signal.SIGSTOP)
    if mode == "slow":  # answers, but long after the agent gave up on it
        time.sleep(float(os.environ.get("CF_FAULTY_DELAY", "5")))
    if mode == "die-mid-reply":  # half a frame, then gone
        os.write(conn.fileno(), len(reply).to_bytes(4, "big") + reply[: len(reply) // 2])
        os._exit(9)
    return reply


def _first_ever() -> bool:
    """True for one batch of one worker in the whole test (``CF_FAULTY_ONCE`` names a
    marker file, made exclusively), so a replacement worker behaves."""
    try:
        os.close(os.open(os.environ["CF_FAULTY_ONCE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main(conn: Any, hold: Any = None) -> None:
    """A worker process's entry point (see the module docstring; ``hold`` as in
    :func:`cipherface.agents.compute_worker.worker_main`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hold is not None:
        hold_fills(lambda: hold.value > 0)
    mode = os.environ.get("CF_FAULTY_WORKER", "")
    keys: collections.OrderedDict[str, Any] = collections.OrderedDict()
    conn.send_bytes(compute_worker.READY)
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return
        reply = compute_worker.answer(frame, keys)
        if _first_ever():
            reply = _spoil(mode, reply, conn)
        conn.send_bytes(reply)
