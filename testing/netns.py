"""Several hosts on one Linux machine: network namespaces on a private bridge.

A :class:`Lan` is a switch (a bridge in a namespace of its own) and hosts plugged
into it, each a network namespace with its own address, loopback and routing: a
process started on one host (:meth:`Host.popen`) reaches the others only through
the switch, and 127.0.0.1 is its own. :meth:`Lan.attach_here` plugs in the test's
own namespace too (the tests drive gateways from there). :meth:`Host.cut` pulls a
host's cable (its switch port goes down: nothing is sent or received, no FIN, no
RST, as when a host loses power), :meth:`Host.plug` puts it back, and
:meth:`Host.kill_all` SIGKILLs every process in it. :class:`PrivatePostgres` runs a
throw-away PostgreSQL server on one of the hosts.

Needs root and iproute2 (``ip netns``); :func:`unavailable` says why not, for a skip.
Everything is removed on close: processes left in our namespaces are killed first.
Nothing here touches the machine's own interfaces besides the one veth that
``attach_here`` adds (removed on close). Clocks are the machine's: a namespace
cannot skew the wall clock, so clock differences between hosts are not simulated.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

#: Where Debian puts PostgreSQL's server binaries (newest version first).
PG_GLOB: Final = "/usr/lib/postgresql/*/bin"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can.

    Returns:
        A one-line reason (not root, no ``ip``, ``ip netns add`` refused), or None.
    """
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    probe = f"cfprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200-254.x.x that no route or address of this namespace overlaps."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if first not in ("default", "broadcast", "local"):
                used.append(ipaddress.ip_network(first, strict=False))
    for _ in range(100):
        net = ipaddress.IPv4Network(
            f"10.{200 + secrets.randbelow(55)}.{secrets.randbelow(256)}.0/24"
        )
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x /24 subnet for a test LAN")


@dataclass
class Host:
    """One host on a :class:`Lan`: a network namespace with one address.

    Args:
        name: the namespace's name (None: the test's own namespace).
        ip: its address on the LAN.
        lan: the LAN it is plugged into.
        port: its port on the switch (a veth end in the switch's namespace).
    """

    name: str | None
    ip: str
    lan: Lan = field(repr=False)
    port: str = ""

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run on this host (``ip netns exec NAME ...``)."""
        return list(cmd) if self.name is None else ["ip", "netns", "exec", self.name, *cmd]

    @property
    def launcher(self) -> tuple[str, ...]:
        """The argv prefix that runs a command on this host."""
        return tuple(self.argv([]))

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` on this host (``subprocess.Popen`` arguments pass through)."""
        return subprocess.Popen(self.argv(cmd), **kwargs)

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on this host to the end; raises on a non-zero exit."""
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, check=True, **kwargs)

    def cut(self) -> None:
        """Pull the cable: the host's switch port goes down (no FIN, no RST)."""
        _ip("-n", self.lan.switch, "link", "set", self.port, "down")

    def plug(self) -> None:
        """Put the cable back (the host's processes carry on where they were)."""
        _ip("-n", self.lan.switch, "link", "set", self.port, "up")

    def pids(self) -> list[int]:
        """Processes running in this host's namespace."""
        if self.name is None:
            raise ValueError("the test's own namespace is not ours to list")
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process on this host (a host that dies, cable still in)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Lan:
    """A private LAN of network namespaces (a bridge in its own namespace).

    Use as a context manager. Namespace names start with ``cf<tag>``, so tests
    running at once never share one.

    Raises:
        RuntimeError: the namespaces cannot be made (see :func:`unavailable`).
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.net = _free_subnet()
        self.switch = f"cf{self.tag}sw"
        self.hosts: list[Host] = []
        self._next = 2
        self._root_veth: str | None = None
        self._made: list[str] = []

    @property
    def prefix(self) -> str:
        """The LAN's subnet, ``10.a.b.0/24``."""
        return str(self.net)

    def _address(self) -> str:
        if self._next > 250:
            raise RuntimeError("this LAN is full")
        ip = str(self.net.network_address + self._next)
        self._next += 1
        return ip

    def open(self) -> Lan:
        """Create the switch namespace and its bridge."""
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def host(self, label: str) -> Host:
        """Plug in a new host (a namespace with ``lo`` and ``eth0`` up).

        Args:
            label: a short name (letters and digits, at most 6).

        Returns:
            The :class:`Host`.
        """
        if not (label.isalnum() and len(label) <= 6):
            raise ValueError(f"host label {label!r}: at most 6 letters and digits")
        name = f"cf{self.tag}{label}"
        ip = self._address()
        _ip("netns", "add", name)
        self._made.append(name)
        port = f"p{label}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", name)  # fmt: skip
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", name, "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        host = Host(name=name, ip=ip, lan=self, port=port)
        self.hosts.append(host)
        return host

    def attach_here(self) -> Host:
        """Plug the test's own namespace into the LAN (one veth, removed on close).

        Returns:
            A :class:`Host` whose commands run here, unwrapped.
        """
        ip = self._address()
        veth, port = f"cf{self.tag}", "phere"
        _ip("link", "add", veth, "type", "veth", "peer", "name", port, "netns", self.switch)
        self._root_veth = veth
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("addr", "add", f"{ip}/{self.net.prefixlen}", "dev", veth)
        _ip("link", "set", veth, "up")
        host = Host(name=None, ip=ip, lan=self, port=port)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        """Kill what still runs in our namespaces, then delete them and our veth."""
        for host in self.hosts:
            if host.name is not None:
                host.kill_all()
        deadline = time.monotonic() + 5
        while any(h.pids() for h in self.hosts if h.name) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._root_veth is not None:
            _ip("link", "del", self._root_veth, check=False)
            self._root_veth = None
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> Lan:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def postgres_bin() -> Path | None:
    """PostgreSQL's server binaries (``CIPHERFACE_PG_BIN``, else the newest Debian one)."""
    given = os.environ.get("CIPHERFACE_PG_BIN")
    if given:
        return Path(given) if (Path(given) / "initdb").exists() else None
    found = sorted(Path("/").glob(PG_GLOB.lstrip("/")), key=lambda p: p.parent.name)
    found = [p for p in found if (p / "initdb").exists() and p.parent.name.isdigit()]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


def as_user(user: str) -> list[str]:
    """``setpriv`` prefix running a command as OS ``user`` (it execs: signals reach it)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]


def initdb(bin_dir: Path, directory: Path, user: str) -> Path:
    """A new cluster in ``directory/data``, owned and initialised by OS ``user``; its path."""
    shutil.chown(directory, user)
    data = directory / "data"
    subprocess.run([*as_user(user), str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=reject", "--no-sync", "--no-instructions"],
                   capture_output=True, check=True, timeout=120, cwd=directory)  # fmt: skip
    return data


def log_tail(directory: Path, lines: int = 15) -> str:
    """The end of ``directory/server.log`` on one line (for error messages)."""
    path = directory / "server.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


class PrivatePostgres:
    """A throw-away PostgreSQL server on one host of a :class:`Lan`.

    ``initdb`` into a new temporary directory as the ``postgres`` OS user, listening
    on the host's LAN address only, trust authentication for the LAN's subnet (and
    nothing else), ``fsync`` off (the database host never crashes in these tests).
    A server someone else runs (5432 on this machine) is never touched.

    Args:
        host: where it runs.
        port: its port there.
        user: the OS user that owns and runs it.

    Raises:
        RuntimeError: no PostgreSQL binaries, no such OS user, or it does not start.
    """

    def __init__(self, host: Host, *, port: int = 5432, user: str = "postgres") -> None:
        self.host, self.port, self.user = host, port, user
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError(f"no PostgreSQL server binaries ({PG_GLOB} or CIPHERFACE_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="cipherface-pg-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@IP:PORT/DATABASE`` (trust: no password)."""
        return f"postgresql://postgres@{self.host.ip}:{self.port}/{database}"

    def start(self, *, timeout: float = 60.0) -> None:
        """Initialise the cluster and start the server; returns once it accepts logins."""
        assert self.bin is not None
        data = initdb(self.bin, self.dir, self.user)
        hba = data / "pg_hba.conf"
        hba.write_text(f"host all postgres {self.host.lan.prefix} trust\n")
        log = (self.dir / "server.log").open("ab")
        try:
            settings = {
                "listen_addresses": self.host.ip,
                "unix_socket_directories": str(self.dir),
                "fsync": "off",
                "max_connections": "200",
            }
            options = [arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]
            self._proc = self.host.popen(
                [*as_user(self.user), str(self.bin / "postgres"), "-D", str(data),
                 "-p", str(self.port), *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                cwd=self.dir,
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host.ip, self.port), timeout=1):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not listen in {timeout:g} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's log (for error messages)."""
        return log_tail(self.dir, lines)

    def close(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and remove its directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "PG_GLOB",
    "Host",
    "Lan",
    "PrivatePostgres",
    "as_user",
    "initdb",
    "log_tail",
    "postgres_bin",
    "unavailable",
]
