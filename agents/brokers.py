"""Private NATS and RabbitMQ brokers speaking MQTT, for tests and local trials.

Both are brokers users cluster, and both lack MQTT shared subscriptions (``$share``:
a shared subscription is accepted and never receives); both speak MQTT 3.1.1 only
(FACTS "Brokers besides Mosquitto"). Each class starts its own server process on
free loopback ports in a directory of its own, and never touches a service already
running on the machine (RabbitMQ's node on :5672 stays as it is).

    with NatsBroker() as nats:            # nats-server with JetStream + MQTT, ~0.3 s
        BrokerConfig(url=nats.url, mqtt_version="3.1.1")
    with RabbitMqBroker() as rabbit:      # rabbitmq-server + rabbitmq_mqtt, ~25 s
        ...
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cipherface.agents.broker import LOOPBACK, BrokerUnavailableError, free_port


def _wait_port(host: str, port: int, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while True:
        if proc.poll() is not None:
            raise BrokerUnavailableError(f"the broker exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"the broker did not listen on {host}:{port} in time"
                ) from None
            time.sleep(0.1)


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerUnavailableError(f"{name} is not installed")
    return found


class _Managed:
    """A broker process we own: ``url``, ``host``, ``port``; a context manager."""

    host = LOOPBACK
    port: int
    mqtt_version = "3.1.1"

    def __init__(self, workdir: str | os.PathLike[str] | None) -> None:
        self._owns_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="cf-broker-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Any:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NatsBroker(_Managed):
    """``nats-server`` with JetStream and its MQTT gateway on free loopback ports.

    Args:
        workdir: config, JetStream store and log (default: a new temp dir, removed
            on close).
        startup_timeout: seconds to wait for the MQTT listener.

    Raises:
        BrokerUnavailableError: no ``nats-server``, or it fails to start.
    """

    def __init__(
        self, *, workdir: str | os.PathLike[str] | None = None, startup_timeout: float = 15.0
    ) -> None:
        super().__init__(workdir)
        self.binary = _binary("nats-server")
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.nats_port = free_port()

    def start(self) -> None:
        conf = self.workdir / "nats.conf"
        conf.write_text(
            "\n".join(
                [
                    f'server_name: "cf-{self.port}"',
                    f"listen: {self.host}:{self.nats_port}",
                    "max_payload: 67108864",  # 64 MiB, the protocol's largest message
                    f'jetstream {{ store_dir: "{self.workdir / "js"}" }}',
                    f"mqtt {{ listen: {self.host}:{self.port} }}",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        log = open(self.workdir / "nats.log", "ab")
        self._proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        _wait_port(self.host, self.port, time.monotonic() + self.startup_timeout, self._proc)


class RabbitMqBroker(_Managed):
    """A private RabbitMQ node with the MQTT plugin (FACTS: "Brokers besides Mosquitto").

    Runs ``rabbitmq-server`` under its own node name, ports and directory; the
    machine's own RabbitMQ service is left alone. Starting takes about 25 s.

    Args:
        workdir: node directory (default: a new temp dir, removed on close).
        startup_timeout: seconds to wait for the MQTT listener.

    Raises:
        BrokerUnavailableError: no ``rabbitmq-server``, or it fails to start.
    """

    def __init__(
        self, *, workdir: str | os.PathLike[str] | None = None, startup_timeout: float = 90.0
    ) -> None:
        super().__init__(workdir)
        self.binary = _binary("rabbitmq-server")
        self.ctl = _binary("rabbitmqctl")
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.node = f"cf{self.port}@localhost"

    def _env(self) -> dict[str, str]:
        d = self.workdir
        return dict(
            os.environ,
            HOME=str(d),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_PORT=str(free_port()),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(d / "feature_flags"),
        )

    def start(self) -> None:
        d = self.workdir
        os.chmod(d, 0o777)  # the node drops to the rabbitmq user  # noqa: S103
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        (d / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "listeners.tcp.default = 127.0.0.1:" + str(free_port()),
                    f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
                    f"management.tcp.port = {free_port()}",
                    "mqtt.allow_anonymous = true",
                    "mqtt.default_user = guest",
                    "mqtt.default_pass = guest",
                    "loopback_users = none",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        for path in d.iterdir():
            os.chmod(path, 0o666 if path.is_file() else 0o777)
        self._env_cache = self._env()
        log = open(d / "server.out", "ab")
        self._proc = subprocess.Popen([self.binary], env=self._env_cache, stdout=log, stderr=log)
        log.close()
        _wait_port(self.host, self.port, time.monotonic() + self.startup_timeout, self._proc)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            subprocess.run(
                [self.ctl, "-n", self.node, "stop"],
                env=self._env_cache,
                capture_output=True,
                timeout=60,
                check=False,
            )
        super().stop()


__all__ = ["NatsBroker", "RabbitMqBroker"]
