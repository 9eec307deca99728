"""Start a throw-away Mosquitto for tests and the demo.

:class:`LocalBroker` renders a Mosquitto 2 configuration into a temporary
directory and runs the ``mosquitto`` binary on free loopback ports (or on an
address and port given, under a launcher such as ``ip netns exec``: the multi-host
tests). Two profiles:

* ``"dev"`` -- one plain loopback listener, **anonymous allowed, no ACL**. Only for
  tests and the local demo; it never leaves 127.0.0.1.
* ``"secure"`` -- the project's ``mosquitto.conf`` (no anonymous, password file,
  ACL file, TLS listener) with its ``/mosquitto/...`` paths and ports rewritten,
  so the tests exercise the very configuration that ships.

Both keep the project's limits (message size, queues, TCP_NODELAY) and enable
persistence, so :meth:`LocalBroker.restart` keeps persistent sessions and their
queued QoS 1 messages.

:func:`find_broker` says where a broker can come from: ``MQTT_URL``, the
``mosquitto`` binary, or Docker (testcontainers), in that order.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from cipherface.errors import InvalidArgumentError, LocalError

#: The project's broker configuration (repository root), used by both profiles.
PROJECT_CONFIG: Final = Path(__file__).resolve().parents[1] / "mosquitto.conf"
#: Image the Docker fallback runs (same as docker-compose.yml).
MOSQUITTO_IMAGE: Final = "eclipse-mosquitto:2"
LOOPBACK: Final = "127.0.0.1"

_RUNNING: Final = re.compile(rb"mosquitto version \S+ running")

HOW_TO_GET_A_BROKER: Final = (
    "no MQTT broker available: install Mosquitto 2 (Debian/Ubuntu: "
    "'apt-get install -y mosquitto'; macOS: 'brew install mosquitto'), "
    "or start a Docker engine (testcontainers runs eclipse-mosquitto:2), "
    "or point MQTT_URL at a running broker (e.g. MQTT_URL=mqtt://127.0.0.1:1883)"
)

Profile = Literal["dev", "secure"]
Backend = Literal["binary", "docker"]

# Options that name files or directories; the renderer maps each one or refuses.
_AUTH_OPTIONS: Final = frozenset(
    {"password_file", "acl_file", "allow_anonymous", "use_username_as_clientid"}
)
_TLS_FILE_OPTIONS: Final = ("cafile", "certfile", "keyfile")


class BrokerUnavailableError(LocalError):
    """No broker can be found or started here (the message says how to get one)."""

    code = "broker_unavailable"


@dataclass(frozen=True, kw_only=True)
class BrokerFiles:
    """Files a broker configuration refers to.

    Args:
        password_file: Mosquitto password file (``user:$7$...`` lines).
        acl_file: Mosquitto ACL file.
        cafile: CA certificate (PEM) for the TLS listener.
        certfile: the broker's certificate (PEM).
        keyfile: the broker's private key (PEM, 0600).
    """

    password_file: Path | None = None
    acl_file: Path | None = None
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    @property
    def has_tls(self) -> bool:
        """True when the CA, certificate and key are all given."""
        return None not in (self.cafile, self.certfile, self.keyfile)


@dataclass(frozen=True, kw_only=True)
class BrokerSource:
    """Where a broker can come from, as found by :func:`find_broker`.

    Args:
        kind: ``"url"`` (an external broker), ``"binary"`` or ``"docker"``.
        url: the external broker's URL (``kind == "url"``).
        binary: path of the ``mosquitto`` executable (``kind == "binary"``).
        detail: a one-line human description.
    """

    kind: Literal["url", "binary", "docker"]
    detail: str
    url: str | None = None
    binary: str | None = None


class UrlParts:
    """``host`` / ``port`` / ``tls`` of a class's ``url`` (an ``mqtt(s)://`` broker URL)."""

    url: str

    @property
    def host(self) -> str:
        """Host name or address."""
        return parse_broker_url(self.url)[1]

    @property
    def port(self) -> int:
        """TCP port."""
        return parse_broker_url(self.url)[2]

    @property
    def tls(self) -> bool:
        """Whether the URL asks for TLS (``mqtts://``)."""
        return parse_broker_url(self.url)[0] == "mqtts"


@dataclass(frozen=True, kw_only=True)
class ExternalBroker(UrlParts):
    """A broker someone else runs (``MQTT_URL``): same attributes, no restart.

    Args:
        url: ``mqtt://host:port`` or ``mqtts://host:port``.
    """

    url: str

    def restart(self) -> None:
        """Refuse: an external broker is not ours to restart.

        Raises:
            BrokerUnavailableError: always.
        """
        raise BrokerUnavailableError(f"cannot restart the external broker {self.url}")


def parse_broker_url(url: str) -> tuple[Literal["mqtt", "mqtts"], str, int]:
    """Split ``mqtt://host[:port]`` / ``mqtts://host[:port]``.

    Args:
        url: the broker URL; the port defaults to 1883 (mqtt) or 8883 (mqtts).

    Returns:
        ``(scheme, host, port)``.

    Raises:
        InvalidArgumentError: another scheme, no host, or a bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise InvalidArgumentError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise InvalidArgumentError(f"broker URL {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgumentError(f"broker URL {url!r} has a bad port") from None
    scheme: Literal["mqtt", "mqtts"] = "mqtts" if parts.scheme == "mqtts" else "mqtt"
    return scheme, parts.hostname, port or (8883 if scheme == "mqtts" else 1883)


def mosquitto_binary() -> str | None:
    """Path of the ``mosquitto`` executable, or None.

    Debian installs it in ``/usr/sbin``, which is not on a normal user's PATH.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in (
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def docker_available(timeout: float = 2.0) -> bool:
    """Tell whether a Docker engine answers and testcontainers is importable."""
    try:
        import docker
        import testcontainers.core.container  # noqa: F401
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=max(1, int(timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # the SDK raises many kinds (no socket, permission, API errors)
        return False


def find_broker(*, env: Mapping[str, str] | None = None, use_docker: bool = True) -> BrokerSource:
    """Find a broker: ``MQTT_URL``, then ``mosquitto`` on PATH, then Docker.

    Args:
        env: environment to read ``MQTT_URL`` from (default ``os.environ``); pass ``{}``
            to insist on a broker we start ourselves.
        use_docker: also try a Docker engine (testcontainers) when there is no binary.

    Returns:
        A :class:`BrokerSource`.

    Raises:
        BrokerUnavailableError: nothing found; the message says how to get a broker.
        InvalidArgumentError: ``MQTT_URL`` is set but malformed.
    """
    environ = os.environ if env is None else env
    url = environ.get("MQTT_URL", "").strip()
    if url:
        parse_broker_url(url)
        return BrokerSource(kind="url", url=url, detail=f"external broker MQTT_URL={url}")
    binary = mosquitto_binary()
    if binary:
        return BrokerSource(kind="binary", binary=binary, detail=f"local {binary}")
    if use_docker and docker_available():
        return BrokerSource(kind="docker", detail=f"Docker image {MOSQUITTO_IMAGE}")
    raise BrokerUnavailableError(HOW_TO_GET_A_BROKER)


def free_port(host: str = LOOPBACK) -> int:
    """Ask the kernel for a free TCP port on ``host`` (racy, but we retry on clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- config rendering
@dataclass(frozen=True, kw_only=True)
class _Block:
    """A ``listener`` line and the options that follow it (or the global head)."""

    header: str | None
    lines: tuple[str, ...]

    @property
    def is_tls(self) -> bool:
        return any(_option(line)[0] == "certfile" for line in self.lines)


def _option(line: str) -> tuple[str, str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return "", ""
    name, _, value = stripped.partition(" ")
    return name, value.strip()


def _split_blocks(text: str) -> list[_Block]:
    blocks: list[_Block] = []
    header: str | None = None
    lines: list[str] = []
    for raw in text.splitlines():
        name, _ = _option(raw)
        if name == "listener":
            blocks.append(_Block(header=header, lines=tuple(lines)))
            header, lines = raw.strip(), []
        elif name:
            lines.append(raw.strip())
    blocks.append(_Block(header=header, lines=tuple(lines)))
    return blocks


def render_config(
    template: str,
    *,
    profile: Profile,
    workdir: Path,
    port: int,
    tls_port: int | None,
    files: BrokerFiles,
    bind: str = LOOPBACK,
    run_as: str | None = None,
    extra: Sequence[str] = (),
) -> str:
    """Rewrite the project's ``mosquitto.conf`` for a local test broker.

    Ports become ``port`` / ``tls_port`` on ``bind``; ``/mosquitto/...`` paths become
    ``files`` and ``workdir``; logging goes to ``workdir/mosquitto.log``. The
    ``dev`` profile drops authentication (anonymous, no ACL) and keeps everything
    else. Any other absolute path in the template is refused rather than guessed.

    Args:
        template: text of the project's configuration.
        profile: ``"dev"`` or ``"secure"``.
        workdir: where persistence data and the log go.
        port: port of the plain listener.
        tls_port: port of the TLS listener, or None to drop it.
        files: password/ACL/TLS files (``secure`` needs the first two).
        bind: address every listener binds.
        run_as: value of Mosquitto's ``user`` option (None: leave it out).
        extra: more lines appended verbatim (tests tune options this way).

    Returns:
        The configuration text.

    Raises:
        InvalidArgumentError: a required file is missing, TLS asked without
            certificates, or the template has an option this renderer cannot map.
    """
    if profile == "secure" and (files.password_file is None or files.acl_file is None):
        raise InvalidArgumentError("the secure profile needs password_file and acl_file")
    if tls_port is not None and not files.has_tls:
        raise InvalidArgumentError("a TLS listener needs cafile, certfile and keyfile")
    head, *listeners = _split_blocks(template)
    out = [f"# rendered by cipherface.agents.broker ({profile} profile) -- do not edit"]
    if run_as is not None:
        out.append(f"user {run_as}")
    data_dir = workdir / "data"
    for line in head.lines:
        name, value = _option(line)
        if name in _AUTH_OPTIONS and profile == "dev":
            continue
        if name in ("log_dest", "persistence_location", "password_file", "acl_file"):
            continue  # re-added below with local paths
        if "/mosquitto/" in value or name in ("include_dir", "persistence_file", "pid_file"):
            raise InvalidArgumentError(f"cannot map option {line!r} for a local broker")
        out.append(line)
    out.append(f"persistence_location {data_dir}/")
    out.append(f"log_dest file {workdir / 'mosquitto.log'}")
    out.append("log_type information")  # LocalBroker waits for the "running" line
    if profile == "dev":
        out.append("allow_anonymous true")
    else:
        out.append(f"password_file {files.password_file}")
        out.append(f"acl_file {files.acl_file}")
    seen_plain = seen_tls = False
    for block in listeners:
        if block.is_tls:
            if tls_port is None or seen_tls:
                continue
            seen_tls = True
            out.append(f"listener {tls_port} {bind}")
            tls_paths = {
                "cafile": files.cafile,
                "certfile": files.certfile,
                "keyfile": files.keyfile,
            }
            for line in block.lines:
                name, value = _option(line)
                if name in _AUTH_OPTIONS and profile == "dev":
                    continue
                if name in tls_paths:
                    out.append(f"{name} {tls_paths[name]}")
                elif "/" in value and name != "tls_version":
                    raise InvalidArgumentError(f"cannot map option {line!r} for a local broker")
                else:
                    out.append(line)
        else:
            if seen_plain:
                continue
            seen_plain = True
            out.append(f"listener {port} {bind}")
            for line in block.lines:
                name, value = _option(line)
                if name in _AUTH_OPTIONS and profile == "dev":
                    continue
                if "/" in value:
                    raise InvalidArgumentError(f"cannot map option {line!r} for a local broker")
                out.append(line)
    if not seen_plain:
        out.append(f"listener {port} {bind}")
    if tls_port is not None and not seen_tls:
        raise InvalidArgumentError("TLS asked but the template has no TLS listener")
    out.extend(extra)
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------- processes
def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


class LocalBroker:
    """A Mosquitto we start, on free loopback ports, in a temporary directory.

    Use as a context manager; ``.url`` is ``mqtt://127.0.0.1:PORT`` and, with TLS,
    ``.tls_url`` is ``mqtts://127.0.0.1:TLS_PORT`` (``bind`` names another address).
    Stopping keeps the directory (so :meth:`restart` and :meth:`start` keep
    persistent sessions); leaving the ``with`` block or :meth:`close` also removes a
    directory we created.

    Args:
        profile: ``"dev"`` (anonymous, no ACL: tests only) or ``"secure"`` (the
            project's config: passwords, ACL, TLS).
        files: password/ACL/TLS files; TLS is on when ``files.has_tls``.
        template: configuration to derive from (default: the project's mosquitto.conf).
        workdir: directory for config, log and persistence (default: a new temp dir).
        backend: ``"binary"`` runs ``mosquitto``; ``"docker"`` runs ``eclipse-mosquitto:2``
            through testcontainers.
        binary: the ``mosquitto`` executable (default: found on PATH or in /usr/sbin).
        startup_timeout: seconds to wait for the listeners to accept connections.
        extra_config: more configuration lines, appended verbatim.
        bind: address the listeners bind (binary backend). Anything but loopback
            opens the ``dev`` profile (anonymous, every topic) to that network: only
            for a private test network (``cipherface.testing.netns``).
        port: the plain listener's port (default: a free one on ``bind``); given, TLS
            takes ``port + 1`` and a clash is an error, not a move to another port.
        launcher: argv prefix the binary runs under, e.g. ``("ip", "netns", "exec",
            "broker-host")`` to start it in another network namespace (``bind`` is
            then an address of that namespace, and ``port`` should be given).

    Raises:
        BrokerUnavailableError: no binary / Docker, or the broker fails to start.
        InvalidArgumentError: a bad combination of arguments.
    """

    def __init__(
        self,
        *,
        profile: Profile = "dev",
        files: BrokerFiles | None = None,
        template: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        backend: Backend = "binary",
        binary: str | None = None,
        startup_timeout: float = 10.0,
        extra_config: Sequence[str] = (),
        bind: str = LOOPBACK,
        port: int | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        if backend == "docker" and (bind != LOOPBACK or launcher or port is not None):
            raise InvalidArgumentError("bind, port and launcher apply to the binary backend")
        if launcher and port is None:
            raise InvalidArgumentError("a launcher needs a port (free ports are found here)")
        self.profile: Profile = profile
        self.files = files or BrokerFiles()
        self.backend: Backend = backend
        self.startup_timeout = startup_timeout
        self._extra = tuple(extra_config)
        template_path = Path(template) if template is not None else PROJECT_CONFIG
        try:
            self._template = template_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BrokerUnavailableError(
                f"cannot read the broker configuration {template_path}: {exc}"
            ) from exc
        if backend == "binary":
            self._binary = binary or mosquitto_binary()
            if self._binary is None:
                raise BrokerUnavailableError(HOW_TO_GET_A_BROKER)
        elif backend != "docker":
            raise InvalidArgumentError(f"unknown backend {backend!r}")
        self._owns_dir = workdir is None
        self.workdir = Path(
            tempfile.mkdtemp(prefix="cipherface-mosquitto-") if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(mode=0o700, exist_ok=True)
        self.host = bind
        self._launcher = tuple(launcher)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(bind)
        self.tls_port: int | None = None
        if self.files.has_tls:
            self.tls_port = port + 1 if port is not None else free_port(bind)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._container: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._started_once = False
        self._write_config()

    # -------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` (the plain listener; HOST is ``bind``, loopback by default)."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        """``mqtts://HOST:TLS_PORT``, or None without TLS."""
        return None if self.tls_port is None else f"mqtts://{self.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        """Whether the broker process / container is up."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._container is not None

    # -------------------------------------------------------------- lifecycle
    def _write_config(self) -> None:
        in_docker = self.backend == "docker"
        text = render_config(
            self._template,
            profile=self.profile,
            workdir=self.workdir,
            port=self.port,
            tls_port=self.tls_port,
            files=self._container_files() if in_docker else self.files,
            bind="0.0.0.0" if in_docker else self.host,  # noqa: S104 -- inside the container
            # Root would otherwise drop to user "mosquitto", who cannot read our 0600 files.
            run_as="root" if in_docker or os.geteuid() == 0 else None,
            extra=self._extra,
        )
        self.config_path.write_text(text, encoding="utf-8")

    def _container_files(self) -> BrokerFiles:
        # The container sees only workdir (mounted at the same path): copy the files in.
        copies: dict[str, Path | None] = {}
        for name in ("password_file", "acl_file", "cafile", "certfile", "keyfile"):
            src: Path | None = getattr(self.files, name)
            if src is None:
                copies[name] = None
                continue
            dst = self.workdir / "files" / Path(src).name
            dst.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            copies[name] = dst
        return BrokerFiles(**copies)

    def start(self) -> None:
        """Start the broker and wait until every listener accepts connections.

        Raises:
            BrokerUnavailableError: it exits early or does not listen in time
                (the message quotes the end of its log).
        """
        if self.running:
            return
        for attempt in range(3):
            log_offset = self._log_size()
            if self.backend == "docker":
                self._start_docker()
            else:
                self._start_binary()
            try:
                self._wait_ready(log_offset)
            except BrokerUnavailableError as exc:
                # free_port() is racy: another process may take the port before
                # Mosquitto binds it. Only a first start may move (restart keeps ports).
                if (
                    self._started_once
                    or self._fixed_port
                    or attempt == 2
                    or "already in use" not in str(exc)
                ):
                    raise
                self.stop()
                self.port = free_port(self.host)
                self.tls_port = free_port(self.host) if self.tls_port is not None else None
                self._write_config()
                continue
            self._started_once = True
            return

    def _start_binary(self) -> None:
        assert self._binary is not None
        stderr = (self.workdir / "mosquitto.stderr").open("ab")
        try:
            self._proc = subprocess.Popen(
                [*self._launcher, self._binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C in the test runner is not for it
            )
        finally:
            stderr.close()
        # If the owner forgets to stop it, the process still dies with us.
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)

    def _start_docker(self) -> None:
        try:
            from testcontainers.core.container import DockerContainer
        except ImportError as exc:
            raise BrokerUnavailableError(f"{HOW_TO_GET_A_BROKER} ({exc})") from exc
        container = (
            DockerContainer(MOSQUITTO_IMAGE)
            .with_volume_mapping(str(self.workdir), str(self.workdir), "rw")
            .with_bind_ports(self.port, self.port)
            .with_command(f"mosquitto -c {self.config_path}")
        )
        if self.tls_port is not None:
            container = container.with_bind_ports(self.tls_port, self.tls_port)
        self._container = container.start()

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_ready(self, log_offset: int) -> None:
        # Ready = Mosquitto logged "running" (every listener bound: a port that some
        # other process holds would fool a bare TCP probe) and the ports accept.
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerUnavailableError(
                    f"mosquitto exited with status {self._proc.returncode}: {self.log_tail()}"
                )
            with contextlib.suppress(FileNotFoundError):
                with self.log_path.open("rb") as fh:
                    fh.seek(log_offset)
                    if _RUNNING.search(fh.read()):
                        break
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailableError(
                    f"mosquitto did not start within {self.startup_timeout} s: {self.log_tail()}"
                )
            time.sleep(0.02)
        for port in (self.port, self.tls_port):
            if port is None:
                continue
            try:
                with socket.create_connection((self.host, port), timeout=2):
                    pass
            except OSError as exc:
                self.stop()
                raise BrokerUnavailableError(
                    f"mosquitto runs but port {port} refuses connections ({exc}): {self.log_tail()}"
                ) from exc

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the broker's log and stderr (for error messages)."""
        text = ""
        for path in (self.workdir / "mosquitto.stderr", self.log_path):
            if path.exists():
                text += path.read_text(encoding="utf-8", errors="replace")
        if self._container is not None:
            try:
                out, err = self._container.get_logs()
                text += (out + err).decode("utf-8", "replace")
            except Exception as exc:  # logs are best effort in an error path
                text += f"(no container logs: {exc})"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: Mosquitto saves its persistence file on the way out).

        Args:
            timeout: seconds to wait before SIGKILL.
        """
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            if self._finalizer is not None:
                self._finalizer.detach()
            self._proc = None
        if self._container is not None:
            self._container.stop()
            self._container = None

    def restart(self) -> None:
        """Stop and start again on the same ports, keeping the persistence database.

        Raises:
            BrokerUnavailableError: it does not come back.
        """
        self.stop()
        self.start()

    def reload(self) -> None:
        """Re-read the password and ACL files (SIGHUP), as after ``cipherface creds``.

        Raises:
            BrokerUnavailableError: the broker is not running.
        """
        if self._container is not None:
            self._container.get_wrapped_container().kill(signal="SIGHUP")
            return
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerUnavailableError("the broker is not running")
        self._proc.send_signal(signal.SIGHUP)

    def close(self) -> None:
        """Stop, and remove the working directory if we created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalBroker(profile={self.profile!r}, url={self.url!r}, {state})"


def config_value(text: str, option: str) -> str | None:
    """The value of the first ``option`` line in a Mosquitto config text, or None."""
    for line in text.splitlines():
        name, value = _option(line)
        if name == option:
            return value
    return None


__all__ = [
    "HOW_TO_GET_A_BROKER",
    "MOSQUITTO_IMAGE",
    "PROJECT_CONFIG",
    "BrokerFiles",
    "BrokerSource",
    "BrokerUnavailableError",
    "ExternalBroker",
    "LocalBroker",
    "config_value",
    "docker_available",
    "find_broker",
    "free_port",
    "mosquitto_binary",
    "parse_broker_url",
    "render_config",
]
