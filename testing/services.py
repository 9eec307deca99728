"""The project's parts, started for a test: keys, a cloud agent, an edge, a gateway.

Each ``open_*`` is a context manager that starts the real thing and cleans it up
(the cloud agent's persistent session is retired, so nothing lingers on a shared
broker). :class:`Faces` enrolls synthetic or real faces and writes captures;
:class:`Gateway` runs the camera gateway on a folder, so a test can drop a capture
and wait for the JSON event (and Home Assistant entities) an integrator receives.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.cameras.bus import MqttBus
from cipherface.cameras.capture import Bus, Capture
from cipherface.cameras.decide import Policy
from cipherface.cameras.events import IntegratorEvent, availability_topic, camera_topic
from cipherface.cameras.gateway import Gateway as CameraGateway
from cipherface.cameras.outputs.homeassistant import HomeAssistantOutput
from cipherface.cameras.outputs.integrator import JsonEventsOutput
from cipherface.cameras.sources.folder import FolderSource
from cipherface.crypto import sites, thresholds
from cipherface.crypto.engine import EdgeCipher
from cipherface.protocol import Result
from cipherface.testing.faces import FaceEmbedder, synthetic_vector, write_capture

#: Gateway id the fixtures use.
GATEWAY = "gw1"


@dataclass(frozen=True, kw_only=True)
class SiteKeys:
    """A site's key pair on disk and its loaded edge cipher.

    Args:
        directory: the key directory (``private.key`` 0600, ``public.key``).
        cipher: the edge cipher (holds the secret key: keep it in the test).
    """

    directory: Path
    cipher: EdgeCipher

    @property
    def key_id(self) -> str:
        """The key's id (what the cloud files the gallery under)."""
        return self.cipher.key_id

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.cipher.dim

    @property
    def model(self) -> str:
        """Face model the key is for."""
        return self.cipher.model


def make_keys(
    directory: str | os.PathLike[str], *, scheme: str = sites.CKKS, model: str = "Dlib"
) -> SiteKeys:
    """Generate a site's key pair (as ``cipherface keygen`` does) and load it.

    Args:
        directory: the key directory to create.
        scheme: ``ckks`` or a Paillier-family scheme.
        model: the face model (sets the dimension and threshold).

    Returns:
        The :class:`SiteKeys`.
    """
    path = Path(directory)
    sites.generate_key_dir(path, scheme=scheme, dim=thresholds.dim(model), model=model)
    return SiteKeys(directory=path, cipher=sites.load_edge_cipher(path))


def new_site_id(prefix: str = "t") -> str:
    """A fresh site id (a topic level): tests on one broker never see each other."""
    return f"{prefix}{secrets.token_hex(4)}"


@contextmanager
def open_cloud(
    *,
    broker_url: str,
    data_dir: str | os.PathLike[str],
    sites: Sequence[str] | None = None,
    **kwargs: Any,
) -> Iterator[CloudAgent]:
    """A running cloud agent with its own agent id and share group.

    Args:
        broker_url: the broker.
        data_dir: its store (encrypted galleries, persisted replies).
        sites: the sites it serves (None: every site).
        kwargs: more :class:`~cipherface.agents.cloud.CloudAgent` arguments.

    Yields:
        The started agent; stopped and its session retired afterwards.
    """
    kwargs.setdefault("agent_id", f"cloud-{secrets.token_hex(4)}")
    kwargs.setdefault("share_group", f"g{secrets.token_hex(4)}")
    config = BrokerConfig(url=broker_url)
    agent = CloudAgent(broker=config, data_dir=data_dir, sites=sites, **kwargs)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(retire=True)


@contextmanager
def open_edge(
    *,
    broker_url: str,
    keys: SiteKeys,
    site: str,
    gateway: str = GATEWAY,
    **kwargs: Any,
) -> Iterator[EdgeClient]:
    """A connected :class:`~cipherface.agents.edge.EdgeClient` whose key the cloud has.

    Its embedder is a :class:`~cipherface.testing.faces.FaceEmbedder` (synthetic
    captures, or the real model for real photos) unless ``embedder`` is given.

    Args:
        broker_url: the broker.
        keys: the site's keys.
        site: site id.
        gateway: gateway id.
        kwargs: more ``EdgeClient`` arguments (``timeout`` defaults to 10 s).

    Yields:
        The started client, closed afterwards.

    Raises:
        RequestTimeoutError: no cloud agent answers the key publication.
    """
    kwargs.setdefault("timeout", 10.0)
    kwargs.setdefault("embedder", FaceEmbedder(dim=keys.dim, model=keys.model))
    edge = EdgeClient(
        broker=BrokerConfig(url=broker_url),
        cipher=keys.cipher,
        site=site,
        gateway=gateway,
        **kwargs,
    )
    edge.start()
    try:
        edge.publish_key()
        yield edge
    finally:
        edge.close()


class Faces:
    """Enroll people and make captures of them, for one edge.

    Args:
        edge: the edge client that enrolls.
        folder: where captures are written by default.
    """

    def __init__(self, *, edge: EdgeClient, folder: Path) -> None:
        self.edge = edge
        self.folder = folder

    def vector(self, name: str) -> Any:
        """The synthetic face of ``name`` (a unit vector of the key's dimension)."""
        return synthetic_vector(name, self.edge.cipher.dim)

    def enroll(self, name: str, *photos: str | os.PathLike[str]) -> Result:
        """Enroll ``name``: from real photos if given, else from its synthetic face.

        Raises:
            FaceError / MissingWeightsError: real photos without exactly one face, or
                without the face model installed.
            PeerReportedError / RequestTimeoutError: the cloud refused or is absent.
        """
        if photos:
            return self.edge.enroll(name, photos)
        return self.edge.enroll(name, embeddings=self.vector(name))

    def capture(
        self, name: str, *, folder: str | os.PathLike[str] | None = None, filename: str = ""
    ) -> Path:
        """Write a synthetic capture showing ``name`` (``""``: nobody's face).

        Args:
            name: the person.
            folder: where (default: this helper's folder).
            filename: the file's name (default: ``<name>-<random>.png``).

        Returns:
            The capture's path.
        """
        filename = filename or f"{name or 'noface'}-{secrets.token_hex(3)}.png"
        return write_capture(folder or self.folder, name, filename=filename)

    def photo(self, name: str) -> Path:
        """A real photo fetched by ``.ci/setup_data.sh`` (``"obama"``, ``"biden.jpg"``...).

        Skips the test, saying why, unless the photo, the edge extra (deepface, dlib,
        OpenCV) and the face model's weights are all installed.
        """
        import importlib.util

        import pytest

        from cipherface.errors import LocalError
        from cipherface.faces import Embedder, find_photos

        for module in ("deepface", "dlib", "cv2"):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"real faces need the edge extra ({module} missing)")
        try:
            Embedder(model_name=self.edge.model).check_weights()
            return find_photos([name])[Path(name).stem]
        except LocalError as exc:
            pytest.skip(f"real faces need the photos and weights of .ci/setup_data.sh: {exc}")


class _Kept:
    """A gateway output that keeps every outcome, and which captures are finished
    (their file moved), for :meth:`Gateway.wait`."""

    name = "testing"

    def __init__(self) -> None:
        self.events: list[IntegratorEvent] = []
        self.finished: set[str] = set()
        self.cond = threading.Condition()

    def start(self, bus: Bus) -> None:
        pass

    def publish(self, event: IntegratorEvent, capture: Capture) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def finish(self, event_id: str) -> None:
        with self.cond:
            self.finished.add(event_id)
            self.cond.notify_all()

    def close(self) -> None:
        pass


class _Folder(FolderSource):
    """A folder source that reports when a capture is done with (after its file moved:
    outputs see the outcome first, so a test reading the folders must wait for this)."""

    def __init__(self, *, finished: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._finished = finished

    def _capture(self, path: Path, mtime: float) -> Capture:
        capture = super()._capture(path, mtime)
        inner = capture.done

        def done(event: IntegratorEvent | None) -> None:
            try:
                if inner is not None:
                    inner(event)
            finally:
                self._finished(capture.event_id)

        capture.done = done
        return capture


class Gateway:
    """The camera gateway (``cipherface edge --watch``) on a folder, in this process.

    A :class:`~cipherface.cameras.gateway.Gateway` with a folder source (one camera),
    the integrator JSON output and Home Assistant discovery, on its own MQTT
    connection: what a site runs, minus the camera.

    Args:
        edge: the started edge client.
        inbox: the folder it watches (created, with ``done/`` and ``failed/``).
        camera: the camera name its captures carry.
        policy: the camera's accuracy controls (default: one frame decides; captures
            up to 60 s old are fresh, so a loaded CI machine does not see ``stale``).
        discovery_prefix: Home Assistant's discovery prefix.
        poll: seconds between scans.

    Raises:
        BrokerConnectionError: the broker cannot be reached.
    """

    def __init__(
        self,
        *,
        edge: EdgeClient,
        inbox: Path,
        camera: str = "door",
        policy: Policy | None = None,
        discovery_prefix: str = "homeassistant",
        poll: float = 0.05,
    ) -> None:
        self.edge = edge
        self.inbox = inbox
        self.camera = camera
        site, gateway = edge.site, edge.gateway
        #: Topic of every outcome of the camera (Home Assistant's event entity reads it).
        self.event_topic = camera_topic(site, gateway, camera)
        #: Retained ``online`` / ``offline`` of the gateway.
        self.availability_topic = availability_topic(site, gateway)
        self._kept = _Kept()
        self._closed = False
        self._ha = HomeAssistantOutput(
            site=site, gateway=gateway, cameras=[camera], discovery_prefix=discovery_prefix
        )
        self._bus = MqttBus(broker=edge.broker, availability_topic=self.availability_topic)
        self._bus.start()
        self._gateway = CameraGateway(
            edge=edge,
            bus=self._bus,
            sources=[
                _Folder(
                    finished=self._kept.finish, path=inbox, camera=camera, poll=poll, settle=0.0
                )
            ],
            outputs=[
                JsonEventsOutput(),
                self._ha,
                self._kept,
            ],
            default_policy=policy or Policy(attempts=1, max_age_s=60.0, ttl_s=60.0),
        )
        try:
            self._gateway.start()
        except BaseException:
            self._bus.close()
            raise

    @property
    def events(self) -> list[IntegratorEvent]:
        """Every outcome so far, in order."""
        with self._kept.cond:
            return list(self._kept.events)

    def drop(self, photo: str | os.PathLike[str] | bytes, *, filename: str | None = None) -> str:
        """Put a photo into the inbox atomically, as a camera integration should.

        Args:
            photo: a file to copy, or the image's bytes.
            filename: its name in the inbox (default: the file's name).

        Returns:
            The file name: the outcome's ``event_id``.
        """
        if filename is None:
            if isinstance(photo, bytes):
                raise ValueError("give a filename for a photo given as bytes")
            filename = Path(photo).name
        tmp = self.inbox / f".{filename}.{secrets.token_hex(3)}"
        if isinstance(photo, bytes):
            tmp.write_bytes(photo)
        else:
            shutil.copyfile(photo, tmp)
        os.replace(tmp, self.inbox / filename)
        return filename

    def wait(self, event_id: str, *, timeout: float = 30.0) -> IntegratorEvent:
        """The outcome of the capture ``event_id`` (a dropped file's name), once the
        gateway is done with it (the file is in ``done/`` or ``failed/``).

        Raises:
            TimeoutError: no outcome in time.
        """
        deadline = time.monotonic() + timeout
        with self._kept.cond:
            while True:
                if event_id in self._kept.finished:
                    for event in self._kept.events:
                        if event.event_id == event_id:
                            return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no outcome for {event_id} in {timeout:g} s")
                self._kept.cond.wait(left)

    def close(self) -> None:
        """Stop the gateway (it finishes the capture in hand), delete its Home Assistant
        entities (empty retained configs: a shared broker keeps no test entity), then
        say ``offline``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._gateway.close()
            for topic, _config in self._ha.configs():
                self._bus.publish(topic, b"", retain=True)
        finally:
            self._bus.close()


__all__ = [
    "GATEWAY",
    "Faces",
    "Gateway",
    "SiteKeys",
    "make_keys",
    "new_site_id",
    "open_cloud",
    "open_edge",
]
