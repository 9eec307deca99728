"""One process per cloud agent id: notice that another one took ours, and stand down.

A broker hands a client id's session to the newest connection under that id and
closes the older one; Mosquitto 2.0 does not tell the older one why (no DISCONNECT
"session taken over"), so paho reconnects a second later and takes the id back,
and so on. Two workers under one agent id -- a worker cut off from the network,
replaced under its id on another host, and back when the network heals -- would
kick each other off every second, each takeover handing the requests in flight
to the other again.

The agent's retained status (``cipherface/v1/cloud/status/<agent id>``, its last
will too) says who spoke last under the id: every status message has a fresh random
id, and :class:`IdWatch` remembers the ones this process published. Once its own
status has come back through a plain subscription to that topic, a *retained*
status it did not publish (what the topic holds when the agent subscribes again
after a lost connection) means another process used the id while this one was away.
Back from a lost connection the agent announces itself only once the retained
status is its own (or after ``check_s`` when there is none). After a stranger's it
stays quiet, *suspect*: if it loses the connection again within ``suspect_s`` (the
other process, back a second later, took the id again), it stands down for good
-- no reconnection, the session left to the other -- and the other, finding its
own status, carries on. If nobody takes the id back in that time the other process
is gone, and this one announces itself and carries on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from cipherface.errors import CipherFaceError
from cipherface.protocol import Status, decode, encode

log = logging.getLogger(__name__)

#: Seconds a reconnected agent waits for its retained status before announcing itself
#: anyway (a broker that lost its retained messages has none to send).
CHECK_S: Final = 3.0
#: Seconds a suspect agent waits to be displaced before it takes the id as its own:
#: longer than paho's longest reconnect delay (10 s in agents/mqtt.py).
SUSPECT_S: Final = 15.0


class IdWatch:
    """Whose status the agent id's retained status topic holds.

    Args:
        announce: publishes a fresh ``online`` status (through :meth:`mine`).
        check_s: see :data:`CHECK_S`.
        suspect_s: see :data:`SUSPECT_S`.
    """

    def __init__(
        self,
        *,
        announce: Callable[[], None],
        check_s: float = CHECK_S,
        suspect_s: float = SUSPECT_S,
    ) -> None:
        self._announce = announce
        self.check_s = check_s
        self.suspect_s = suspect_s
        self._mine: set[str] = set()
        self._lock = threading.Lock()
        #: Subscribed to the status topic itself (after the agent's start).
        self.watching = False
        #: Our own status came back once: a stranger's now means another process.
        self.armed = threading.Event()
        #: A stranger's status was found since the last connection.
        self.suspect = False
        self.stood_down = False
        self._timer: threading.Timer | None = None  # a pending announcement
        self._gen = 0  # which timer is the pending one (a cancelled one may still fire)

    def mine(self, msg: Status) -> bytes:
        """Remember a status this process publishes; returns its encoding."""
        with self._lock:
            self._mine.add(msg.id)
        return encode(msg)

    def watch(self) -> None:
        """The agent subscribes to its status topic next: its own status, retained, is
        on the way (and arms the watch)."""
        self.watching = True

    def reconnected(self) -> None:
        """A new connection after a loss: announce once the retained status is ours."""
        with self._lock:
            self._cancel()
            if self.armed.is_set():
                self._timer = self._start(self.check_s)
                return
        self._announce()

    def message(self, payload: bytes, *, retained: bool) -> bool:
        """A message on the status topic. Returns whether this process published it.

        Only a *retained* stranger counts (the topic's state when we subscribed): a
        session changing hands redelivers to its new holder what was in flight to
        the previous one.
        """
        try:
            msg = decode(payload)
        except CipherFaceError:
            return False  # not a status (an empty retained message clears the topic)
        if not isinstance(msg, Status):
            return False
        with self._lock:
            if msg.id not in self._mine:
                if retained and self.armed.is_set() and not self.stood_down:
                    if not self.suspect:
                        log.warning(
                            "the agent id's retained status is another process's (%s, %s): "
                            "waiting %g s to see whether it takes the id back",
                            msg.state,
                            msg.id,
                            self.suspect_s,
                        )
                    self.suspect = True
                    self._cancel()
                    self._timer = self._start(self.suspect_s)
                return False
            if self.watching:
                self.armed.set()
            if self._timer is None or self.suspect:
                return True
            self._cancel()
        self._announce()
        return True

    def lost(self) -> bool:
        """The connection was lost. Returns True when the agent must stand down (it
        was suspect: the other process took the id back)."""
        with self._lock:
            if not self.suspect or self.stood_down:
                return False
            self.stood_down = True
            self._cancel()
            return True

    def _start(self, seconds: float) -> threading.Timer:
        self._gen += 1
        timer = threading.Timer(seconds, self._fire, args=(self._gen,))
        timer.daemon = True
        timer.start()
        return timer

    def _fire(self, gen: int) -> None:
        with self._lock:
            if self._timer is None or gen != self._gen or self.stood_down:
                return
            self._timer = None
            if self.suspect:
                log.warning("nobody took the agent id back: this process keeps it")
            self.suspect = False
        self._announce()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Cancel a pending announcement (the agent stops)."""
        with self._lock:
            self._cancel()


__all__ = ["CHECK_S", "SUSPECT_S", "IdWatch"]
