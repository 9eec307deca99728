"""testcontainers for CI that has Docker: the project's broker and its cloud agent.

* :class:`MosquittoContainer` -- ``eclipse-mosquitto:2`` running the project's
  ``mosquitto.conf`` (rendered by :func:`cipherface.agents.broker.render_config`:
  the same limits, persistence and listeners; ``dev`` profile anonymous, ``secure``
  profile with your password file, ACL and TLS files), on a port Docker picks.
* :class:`CipherFaceCloudContainer` -- ``cipherface cloud`` in the image built from
  the project's Dockerfile (or an image you name), connected to a broker URL.

Both are ordinary testcontainers ``DockerContainer`` objects (context managers)::

    with Network() as net, MosquittoContainer(network=net) as broker, \\
            CipherFaceCloudContainer(broker_url=broker.internal_url, network=net):
        ...  # connect edges to broker.url

Files travel into the containers by copy (no bind mount), so a remote Docker host
works too. This module needs ``testcontainers`` (``pip install
cipherface-mqtt[testing]``); nothing else in the package imports it eagerly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Final, Self

from testcontainers.core.container import DockerContainer
from testcontainers.core.image import DockerImage
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from cipherface.agents.broker import (
    MOSQUITTO_IMAGE,
    PROJECT_CONFIG,
    BrokerFiles,
    Profile,
    render_config,
)
from cipherface.errors import InvalidArgumentError, LocalError
from cipherface.testing.brokers import config_template

#: Ports inside the Mosquitto container.
MQTT_PORT: Final = 1883
MQTTS_PORT: Final = 8883
#: Layout of the eclipse-mosquitto image (and of docker-compose.yml).
CONTAINER_DIR: Final = PurePosixPath("/mosquitto")
CONFIG_PATH: Final = CONTAINER_DIR / "config" / "mosquitto.conf"
SECRETS_DIR: Final = CONTAINER_DIR / "secrets"
#: Tag given to the image built from the project's Dockerfile.
CLOUD_IMAGE_TAG: Final = "cipherface:cloud-test"
#: Data directory of the cloud image (a volume in docker-compose.yml).
CLOUD_DATA: Final = "/data"

_MOSQUITTO_READY: Final = re.compile(r"mosquitto version \S+ running")
_CLOUD_READY: Final = re.compile(r"cloud agent \S+ serving")


def project_root() -> Path:
    """The source checkout this package runs from (it holds the Dockerfile).

    Raises:
        LocalError: installed from a wheel, without the sources: name an image instead.
    """
    root = PROJECT_CONFIG.parent
    if not (root / "Dockerfile").is_file() or not (root / "pyproject.toml").is_file():
        raise LocalError(
            f"no project checkout next to the package ({root} has no Dockerfile): "
            "pass image= (a built cipherface image) or context= (a checkout)"
        )
    return root


# ------------------------------------------------------------------ mosquitto
def container_config(
    *, profile: Profile = "dev", tls: bool = False, template: Path | None = None
) -> str:
    """The project's ``mosquitto.conf`` rewritten for :class:`MosquittoContainer`.

    Listeners bind every address of the container (Docker publishes them), the
    log goes to stderr (the container's log, which the readiness check reads:
    Mosquitto 2.0 block-buffers ``log_dest stdout`` into a pipe, so a "running" line
    there can wait for kilobytes of later log), and persistence lives in the image's
    ``/mosquitto/data``.

    Args:
        profile: ``"dev"`` (anonymous, no ACL) or ``"secure"`` (passwords, ACL).
        tls: also open the TLS listener (``secure`` files must then include TLS).
        template: the configuration to start from (default: the project's).

    Returns:
        The configuration text.

    Raises:
        InvalidArgumentError: the template has an option that cannot be mapped.
    """
    secrets = _container_files(profile=profile, tls=tls)
    text = render_config(
        (template or config_template()).read_text(encoding="utf-8"),
        profile=profile,
        workdir=Path(str(CONTAINER_DIR)),
        port=MQTT_PORT,
        tls_port=MQTTS_PORT if tls else None,
        files=secrets,
        bind="0.0.0.0",  # noqa: S104 -- inside the container; Docker publishes the port
        run_as="root",  # reads the copied 0600 files; the container is the boundary
    )
    out = []
    for line in text.splitlines():
        out.append("log_dest stderr" if line.startswith("log_dest file ") else line)
    return "\n".join(out) + "\n"


def _container_files(*, profile: Profile, tls: bool) -> BrokerFiles:
    def at(name: str) -> Path:
        return Path(str(SECRETS_DIR / name))

    auth = profile == "secure"
    return BrokerFiles(
        password_file=at("passwd") if auth else None,
        acl_file=at("acl") if auth else None,
        cafile=at("ca.crt") if tls else None,
        certfile=at("server.crt") if tls else None,
        keyfile=at("server.key") if tls else None,
    )


class MosquittoContainer(DockerContainer):
    """Mosquitto 2 running the project's configuration, in Docker.

    Args:
        image: the Mosquitto image.
        profile: ``"dev"`` (anonymous) or ``"secure"`` (needs ``files``).
        files: password file and ACL (``secure``), and CA/certificate/key for TLS;
            copied into ``/mosquitto/secrets``.
        network: a testcontainers ``Network`` to join (other containers reach the
            broker there as ``alias``).
        alias: the broker's host name on ``network``.
        kwargs: more ``DockerContainer`` arguments.

    Raises:
        InvalidArgumentError: ``secure`` without a password file and ACL.
    """

    def __init__(
        self,
        *,
        image: str = MOSQUITTO_IMAGE,
        profile: Profile = "dev",
        files: BrokerFiles | None = None,
        network: Network | None = None,
        alias: str = "mosquitto",
        **kwargs: Any,
    ) -> None:
        files = files or BrokerFiles()
        if profile == "secure" and (files.password_file is None or files.acl_file is None):
            raise InvalidArgumentError("the secure profile needs password_file and acl_file")
        super().__init__(image, **kwargs)
        self.alias = alias
        self.tls = files.has_tls
        config = container_config(profile=profile, tls=self.tls)
        self.with_command(["mosquitto", "-c", str(CONFIG_PATH)])
        self.with_copy_into_container(config.encode("utf-8"), str(CONFIG_PATH))
        for src, dest in zip(
            (files.password_file, files.acl_file, files.cafile, files.certfile, files.keyfile),
            ("passwd", "acl", "ca.crt", "server.crt", "server.key"),
        ):
            if src is not None:
                data = Path(src).read_bytes()
                self.with_copy_into_container(data, str(SECRETS_DIR / dest), 0o600)
        self.with_exposed_ports(MQTT_PORT, *((MQTTS_PORT,) if self.tls else ()))
        if network is not None:
            self.with_network(network).with_network_aliases(alias)
        self.waiting_for(LogMessageWaitStrategy(_MOSQUITTO_READY))

    @property
    def host(self) -> str:
        """Host where the published ports are."""
        return self.get_container_host_ip()

    @property
    def port(self) -> int:
        """Published port of the plain listener."""
        return int(self.get_exposed_port(MQTT_PORT))

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients outside Docker (your tests)."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        """``mqtts://host:port`` of the TLS listener, or None."""
        if not self.tls:
            return None
        return f"mqtts://{self.host}:{int(self.get_exposed_port(MQTTS_PORT))}"

    @property
    def internal_url(self) -> str:
        """``mqtt://<alias>:1883`` for containers on the same network."""
        return f"mqtt://{self.alias}:{MQTT_PORT}"


# ---------------------------------------------------------------------- cloud
def cloud_command(
    *,
    broker_url: str,
    data: str = CLOUD_DATA,
    agent_id: str = "cloud-test",
    sites: Sequence[str] = (),
    share: bool = True,
) -> list[str]:
    """The command line of the cloud agent in :class:`CipherFaceCloudContainer`.

    Credentials travel in the environment (``CIPHERFACE_USERNAME`` /
    ``CIPHERFACE_PASSWORD``), never on the command line.

    Returns:
        The argv (``cipherface cloud ...``).
    """
    argv = ["cipherface", "cloud", "--broker", broker_url, "--data", data, "--agent-id", agent_id]
    if sites:
        argv += ["--sites", ",".join(sites)]
    if not share:
        argv.append("--no-share")
    return argv


def dockerfile_sources(dockerfile: str) -> list[str]:
    """The local sources the Dockerfile's ``COPY`` lines take from the build context."""
    sources: list[str] = []
    for raw in dockerfile.splitlines():
        words = raw.split()
        if not words or words[0].upper() != "COPY":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        sources.extend(args[:-1])  # the last one is the destination
    return sources


def missing_sources(context: Path, dockerfile: str = "Dockerfile") -> list[str]:
    """``COPY`` sources absent from ``context`` (``*`` suffix: optional glob)."""
    text = (context / dockerfile).read_text(encoding="utf-8")
    missing = []
    for src in dockerfile_sources(text):
        if src.endswith("*"):
            continue
        if not (context / src).exists():
            missing.append(src)
    return missing


class CipherFaceCloudContainer(DockerContainer):
    """A CipherFace cloud agent (``cipherface cloud``) in Docker.

    Args:
        broker_url: the broker as the container sees it (on a shared network:
            :attr:`MosquittoContainer.internal_url`).
        image: an existing image to run; default: build the project's Dockerfile
            (tag :data:`CLOUD_IMAGE_TAG`) from ``context``.
        context: the build context (default: this package's checkout).
        agent_id: the agent's id (MQTT client id).
        sites: serve only these sites (default: every site).
        username: broker account (``secure`` brokers), passed in the environment.
        password: its password, passed in the environment.
        network: a testcontainers ``Network`` to join.
        kwargs: more ``DockerContainer`` arguments.

    Raises:
        LocalError: no image and no checkout, or the checkout lacks a COPY source.
    """

    def __init__(
        self,
        *,
        broker_url: str,
        image: str | None = None,
        context: str | Path | None = None,
        agent_id: str = "cloud-test",
        sites: Sequence[str] = (),
        username: str | None = None,
        password: str | None = None,
        network: Network | None = None,
        **kwargs: Any,
    ) -> None:
        self.context: Path | None = None
        if image is None:
            self.context = Path(context) if context is not None else project_root()
            missing = missing_sources(self.context)
            if missing:
                raise LocalError(f"{self.context} lacks what the Dockerfile copies: {missing}")
        super().__init__(image or CLOUD_IMAGE_TAG, **kwargs)
        self.broker_url = broker_url
        self.with_command(
            cloud_command(broker_url=broker_url, agent_id=agent_id, sites=tuple(sites))
        )
        if username is not None:
            self.with_env("CIPHERFACE_USERNAME", username)
        if password is not None:
            self.with_env("CIPHERFACE_PASSWORD", password)
        if network is not None:
            self.with_network(network)
        self.waiting_for(LogMessageWaitStrategy(_CLOUD_READY))
        self.built: DockerImage | None = None

    def start(self) -> Self:
        """Build the image (first time; Docker's layer cache makes it quick after), then
        run the agent and wait until it serves.

        Raises:
            TimeoutError: it does not serve in time (the note holds its log).
        """
        if self.context is not None and self.built is None:
            self.built = DockerImage(path=self.context, tag=CLOUD_IMAGE_TAG, clean_up=False)
            self.built.build()
            self.image = CLOUD_IMAGE_TAG
        return super().start()


__all__ = [
    "CLOUD_IMAGE_TAG",
    "CipherFaceCloudContainer",
    "MosquittoContainer",
    "cloud_command",
    "container_config",
    "dockerfile_sources",
    "missing_sources",
    "project_root",
]
