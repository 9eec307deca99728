"""The agent-id watch (agents/owner.py) on its own: which retained status makes a
cloud agent announce itself, wait, or stand down. tests/test_fleet.py runs it on a
real broker (two agents under one id; ``cipherface cloud`` exiting 4)."""

from __future__ import annotations

import threading
import time

from cipherface.agents.owner import IdWatch
from cipherface.protocol import Status, encode


def _status(state: str = "online") -> Status:
    return Status(site="cloud", gw="cloud-x", state=state, role="cloud", version="1")  # type: ignore[arg-type]


class _Agent:
    """What the cloud agent does around an IdWatch: announce = publish a fresh status."""

    def __init__(self, **kw: float) -> None:
        self.announced = 0
        self.cond = threading.Condition()
        self.watch = IdWatch(announce=self.announce, **kw)

    def announce(self) -> None:
        with self.cond:
            self.announced += 1
            self.last = self.watch.mine(_status())
            self.cond.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.announced >= count, timeout)


def _armed(**kw: float) -> _Agent:
    """An agent after its start: announced, watching, its own status back."""
    a = _Agent(**kw)
    a.announce()
    a.watch.watch()
    assert a.watch.message(a.last, retained=True)
    assert a.watch.armed.is_set()
    return a


def test_before_its_own_status_comes_back_a_stranger_is_ignored() -> None:
    a = _Agent()
    a.announce()  # a fresh process replacing another: the topic holds the other's status
    assert not a.watch.message(encode(_status()), retained=True)
    assert not a.watch.suspect and not a.watch.armed.is_set()
    a.watch.watch()
    assert a.watch.message(a.last, retained=True) and a.watch.armed.is_set()
    assert not a.watch.lost()


def test_back_after_a_loss_it_announces_once_the_retained_status_is_its_own() -> None:
    a = _armed(check_s=30)
    a.watch.reconnected()
    assert a.announced == 1  # not yet
    assert a.watch.message(a.last, retained=True)
    assert a.announced == 2
    assert not a.watch.lost()


def test_no_retained_status_announces_after_check_s() -> None:
    a = _armed(check_s=0.2)
    a.watch.reconnected()
    assert a.announced == 1
    assert a.wait(2, 5)


def test_a_stranger_then_a_loss_means_stand_down() -> None:
    a = _armed(check_s=0.2, suspect_s=30)
    a.watch.reconnected()
    assert not a.watch.message(encode(_status()), retained=True)
    assert a.watch.suspect
    time.sleep(0.4)
    assert a.announced == 1  # quiet while suspect
    assert a.watch.lost() and a.watch.stood_down
    assert not a.watch.lost()  # once


def test_a_stranger_that_never_comes_back_leaves_the_id_to_us() -> None:
    """The other process is gone too (say, its host lost power): after suspect_s the
    agent announces itself and keeps the id; a later loss is an ordinary one."""
    a = _armed(check_s=30, suspect_s=0.3)
    a.watch.reconnected()
    assert not a.watch.message(encode(_status("offline")), retained=True)  # its will
    assert a.wait(2, 5) and not a.watch.suspect
    assert not a.watch.lost()


def test_only_retained_strangers_count() -> None:
    """A session changing hands redelivers what was in flight to its last holder:
    such a copy is no evidence of who holds the id now."""
    a = _armed(check_s=0.2)
    a.watch.reconnected()
    assert not a.watch.message(encode(_status()), retained=False)
    assert not a.watch.message(b"", retained=True)  # a cleared topic
    assert not a.watch.suspect
    assert a.wait(2, 5)
