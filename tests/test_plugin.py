"""The pytest plugin and testcontainers module (cipherface.testing), on the real parts.

* the fixtures themselves, as the project's suite uses them;
* a downstream project (tests/downstream/) and docs/testing.md's example, each run as
  a project of its own through ``pytester`` with only the plugin's public fixtures;
* the containers: their configuration and command line checked against the local
  Mosquitto binary and cloud agent; the containers themselves where Docker answers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cipherface.agents.broker import docker_available, free_port, mosquitto_binary
from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.testing.brokers import Broker
from cipherface.testing.faces import (
    FaceEmbedder,
    synthetic_name,
    synthetic_png,
    synthetic_vector,
)
from cipherface.testing.recorder import Recorder, integrator_filters
from cipherface.testing.services import Faces, Gateway, SiteKeys, new_site_id, open_edge

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DOWNSTREAM = Path(__file__).resolve().parent / "downstream"
PLUGIN = "cipherface.testing.plugin"


def _entry_point_installed() -> bool:
    return any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))


def _plugin_args() -> list[str]:
    """How a subprocess pytest gets the plugin: the entry point when this install has
    it (CI's ``pip install -e``), else ``-p`` (a checkout installed before it existed)."""
    return ["-p", "no:cacheprovider"] + ([] if _entry_point_installed() else ["-p", PLUGIN])


def _publish(url: str, topic: str, payload: bytes) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(host, int(port))
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


# ------------------------------------------------------------- registration
def test_entry_point_is_declared() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["project"]["entry-points"]["pytest11"] == {"cipherface": PLUGIN}
    assert cfg["tool"]["setuptools"]["package-dir"]["cipherface.testing"] == "testing"
    assert "cipherface.testing" in cfg["tool"]["setuptools"]["packages"]


def test_importing_the_plugin_loads_nothing_heavy() -> None:
    code = (
        "import sys; import cipherface.testing.plugin; "
        "print([m for m in ('numpy', 'tenseal', 'paho', 'testcontainers', 'docker', "
        "'cipherface.agents', 'cipherface.crypto') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_broker_config_falls_back_to_the_packaged_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    from cipherface.testing import brokers

    assert brokers.config_template() == brokers.PROJECT_CONFIG  # a checkout: its own file
    monkeypatch.setattr(brokers, "PROJECT_CONFIG", Path("/nonexistent/mosquitto.conf"))
    assert brokers.config_template() == brokers.PACKAGED_CONFIG  # a wheel install
    assert brokers.PACKAGED_CONFIG.read_text() == (ROOT / "mosquitto.conf").read_text()


def test_plugin_is_inert_until_a_fixture_is_asked_for(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="def test_nothing():\n    assert 1 + 1 == 2\n",
        test_asks="def test_asks(cipherface_site):\n    assert cipherface_site\n",
    )
    result = pytester.runpytest_subprocess(*_plugin_args(), "--setup-plan")
    plan = result.stdout.str()
    plain = plan[plan.index("test_plain.py") :]
    asks = plan[plan.index("test_asks.py") : plan.index("test_plain.py")]
    assert "cipherface" not in plain  # no autouse fixture: nothing set up for it
    assert "cipherface_site" in asks
    from cipherface.testing import plugin

    assert not [n for n in vars(plugin) if n.startswith("pytest_")]  # no hooks


# ------------------------------------------------------------------ fixtures
def test_broker_fixtures(
    cipherface_broker: Broker, cipherface_broker_session: Broker, broker: Broker
) -> None:
    assert broker is cipherface_broker_session  # the suite's own fixture is the plugin's
    for b in (cipherface_broker, cipherface_broker_session):
        assert b.url == f"mqtt://{b.host}:{b.port}"
        assert b.port != 1883  # never the machine's broker, always a free port
    assert cipherface_broker.url != cipherface_broker_session.url


def test_edge_cloud_and_events(
    cipherface_edge: EdgeClient,
    cipherface_cloud: CloudAgent,
    cipherface_faces: Faces,
    cipherface_events: Recorder,
    cipherface_site: str,
    cipherface_keys_session: SiteKeys,
) -> None:
    assert cipherface_cloud.sites == (cipherface_site,)
    assert cipherface_edge.site == cipherface_site
    assert cipherface_edge.cipher is cipherface_keys_session.cipher
    assert cipherface_faces.enroll("alice").enrolled == 1
    assert set(cipherface_edge.ids()) - {None} == {"alice"}  # free slots are None
    d = cipherface_edge.identify(vector=cipherface_faces.vector("alice"), label="door.jpg")
    assert d.match and d.identity == "alice"
    got = cipherface_events.wait_for_decision()
    assert got["identity"] == "alice" and got["photo"] == "door.jpg" and got["match"] is True
    assert got["site"] == cipherface_site and got["gateway"] == "gw1"
    rec = cipherface_events.messages[0]
    assert rec.encoding == "msgpack" and rec.topic.startswith(f"cipherface/v1/{cipherface_site}/")
    assert not {"score", "distance", "scores"} & set(got)  # only decisions leave the edge


def test_recorder_decodes_json_msgpack_and_bytes(
    cipherface_broker: Broker, cipherface_recorder: Callable[..., Recorder]
) -> None:
    rec = cipherface_recorder(["cipherface/v1/s1/#", "ha/#"])
    event = "cipherface/v1/s1/json/gw1/events/door"
    _publish(cipherface_broker.url, event, json.dumps({"event_type": "match"}).encode())
    _publish(cipherface_broker.url, "cipherface/v1/s1/events/gw1", msgpack.packb({"a": [1, 2]}))
    _publish(cipherface_broker.url, "ha/event/node/door/config", json.dumps({"x": 1}).encode())
    _publish(cipherface_broker.url, "cipherface/v1/s1/other", b"\xc1\xff not json")
    rec.wait_for(topic="cipherface/v1/s1/other")
    by_topic = {m.topic: m for m in rec.snapshot()}
    assert (by_topic[event].encoding, by_topic[event].kind) == ("json", "event")
    assert rec.events() == [{"event_type": "match"}]
    mp = by_topic["cipherface/v1/s1/events/gw1"]
    assert (mp.encoding, mp.data, mp.kind) == ("msgpack", {"a": [1, 2]}, "decision")
    assert mp.decision is None and rec.decisions() == []  # msgpack, not a protocol decision
    assert rec.discovery() == {"ha/event/node/door/config": {"x": 1}}
    raw = by_topic["cipherface/v1/s1/other"]
    assert (raw.encoding, raw.data, raw.kind) == ("bytes", None, "other")
    with pytest.raises(TimeoutError, match="topics seen"):
        rec.wait_for(topic="it/never", timeout=0.2)


def test_integrator_filters_refuse_a_wildcard_site() -> None:
    from cipherface.errors import InvalidArgumentError

    assert integrator_filters("s1") == [
        "cipherface/v1/s1/json/#",
        "cipherface/v1/s1/events/+",
        "homeassistant/#",
    ]
    with pytest.raises(InvalidArgumentError):
        integrator_filters("#")


def test_gateway_outcomes_and_folders(
    cipherface_faces: Faces,
    cipherface_gateway: Gateway,
    cipherface_events: Recorder,
    cipherface_recorder: Callable[..., Recorder],
) -> None:
    cipherface_faces.enroll("carol")
    empty = cipherface_gateway.drop(cipherface_faces.capture(""))
    event = cipherface_gateway.wait(empty)
    assert (event.event_type, event.error) == ("error", "no_face")
    ok = cipherface_gateway.drop(synthetic_png("carol"), filename="carol.png")
    event = cipherface_gateway.wait(ok)
    assert (event.event_type, event.identity, event.camera) == ("match", "carol", "door")
    assert (cipherface_gateway.inbox / "done" / "carol.png").exists()
    assert (cipherface_gateway.inbox / "failed" / empty).exists()
    assert [e.event_id for e in cipherface_gateway.events] == [empty, ok]
    published = cipherface_events.wait_for_event(lambda e: e["event_id"] == ok)
    assert published == event.to_dict()  # what integrators get is what the gateway decided
    online = cipherface_events.wait_for(topic=cipherface_gateway.availability_topic)
    assert (online.payload, online.retain) == (b"online", True)
    with pytest.raises(TimeoutError):
        cipherface_gateway.wait("never.png", timeout=0.2)
    announced = set(cipherface_events.discovery())
    assert len(announced) == 3  # the camera's event entity, carol's presence and camera
    cipherface_gateway.close()  # deletes its entities: nothing retained for a later run
    later = cipherface_recorder(["homeassistant/#"])
    late = cipherface_recorder(["cipherface/v1/+/json/#"])
    time.sleep(0.5)
    assert [m for m in later.snapshot() if m.payload] == []
    assert [m.payload for m in late.snapshot()] == [b"offline"]  # availability, retained


def test_fresh_keys_on_the_session_cloud(
    cipherface_broker_session: Broker,
    cipherface_cloud_session: CloudAgent,
    cipherface_keys: SiteKeys,
    cipherface_keys_session: SiteKeys,
) -> None:
    assert cipherface_cloud_session.sites is None  # serves every site
    assert cipherface_keys.key_id != cipherface_keys_session.key_id
    assert (cipherface_keys.directory / "private.key").stat().st_mode & 0o777 == 0o600
    try:
        with open_edge(
            broker_url=cipherface_broker_session.url, keys=cipherface_keys, site=new_site_id()
        ) as edge:
            dave = synthetic_vector("dave", cipherface_keys.dim)
            edge.enroll("dave", embeddings=dave)
            assert edge.verify("dave", vector=dave).match
            assert not edge.verify(
                "dave", vector=synthetic_vector("erin", cipherface_keys.dim)
            ).match
    finally:
        # This suite's other modules share the session broker: a cloud serving every site
        # would get a copy of their requests too and answer some first (seen as
        # "the gallery changed under verify" in tests/test_rotate.py). stop() is idempotent.
        cipherface_cloud_session.stop(retire=True)


@pytest.mark.faces
def test_real_faces_through_the_gateway(
    cipherface_faces: Faces, cipherface_gateway: Gateway, cipherface_events: Recorder
) -> None:
    cipherface_faces.enroll("obama", cipherface_faces.photo("obama"))
    same = cipherface_gateway.drop(cipherface_faces.photo("obama2"))
    other = cipherface_gateway.drop(cipherface_faces.photo("biden"))
    matched = cipherface_events.wait_for_event(lambda e: e["event_id"] == same, timeout=60)
    assert (matched["event_type"], matched["identity"]) == ("match", "obama")
    refused = cipherface_events.wait_for_event(lambda e: e["event_id"] == other, timeout=60)
    assert refused["event_type"] == "unknown"


# -------------------------------------------------------------------- faces
def test_synthetic_capture_is_a_valid_png_naming_its_face(tmp_path: Path) -> None:
    data = synthetic_png("Zoë")
    assert synthetic_name(data) == "Zoë"
    assert (
        synthetic_name(data.replace(b"cipherface-synthetic-face", b"other-keyword-here-xx")) is None
    )
    assert synthetic_name(b"\xff\xd8 a jpeg") is None
    cv2 = pytest.importorskip("cv2")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape == (8, 8)


def test_synthetic_faces_are_stable_and_far_apart() -> None:
    emb = FaceEmbedder(dim=128, model="Dlib")
    a = synthetic_vector("alice", 128)
    assert np.array_equal(a, synthetic_vector("alice", 128))
    shot1, shot2 = emb.represent(synthetic_png("alice")), emb.represent(synthetic_png("alice"))
    assert not np.array_equal(shot1, shot2)  # two photos of one person differ...
    assert 1 - float(shot1 @ a) < 0.001  # ...by far less than Dlib's 0.07 threshold
    assert 1 - float(synthetic_vector("bob", 128) @ a) > 0.5


# ---------------------------------------------------- downstream and the doc
def test_downstream_project_passes(pytester: pytest.Pytester) -> None:
    for path in DOWNSTREAM.iterdir():
        if path.is_file():
            shutil.copy(path, pytester.path / path.name)
    result = pytester.runpytest_subprocess(*_plugin_args(), "-q")
    result.assert_outcomes(passed=5)


def _doc_example() -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    match = re.search(r"<!-- example: test_access\.py.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/testing.md lost its example block"
    return match.group(1)


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Testing your integration\n.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its testing example"
    return match.group(1)


def test_doc_examples_run_as_written(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_access=_doc_example(), test_readme=_readme_example())
    t0 = time.perf_counter()
    result = pytester.runpytest_subprocess(*_plugin_args(), "-q", "--durations=0", "-vv")
    elapsed = time.perf_counter() - t0
    result.assert_outcomes(passed=2)
    durations = [line for line in result.stdout.lines if "test_access.py::" in line]
    print(f"\ndoc examples: {elapsed:.2f} s in a fresh pytest process; {durations}")


def test_startup_time_of_broker_and_cloud(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_startup="""
import time
def test_a(cipherface_cloud, cipherface_broker):
    assert cipherface_broker.url
"""
    )
    result = pytester.runpytest_subprocess(*_plugin_args(), "-q", "--durations=0", "-vv")
    result.assert_outcomes(passed=1)
    setup = [ln for ln in result.stdout.lines if " setup " in ln]
    assert setup, result.stdout.str()
    print(f"\nbroker + cloud fixtures: {setup}")


# ---------------------------------------------------------------- containers
@pytest.fixture
def containers() -> ModuleType:
    """The testcontainers module (skips without testcontainers installed)."""
    return pytest.importorskip("cipherface.testing.containers")


def test_dockerfile_copies_every_package_room(containers: ModuleType) -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    rooms = set(cfg["tool"]["setuptools"]["package-dir"].values())
    sources = set(containers.dockerfile_sources((ROOT / "Dockerfile").read_text()))
    assert rooms <= sources, f"the image would lack {rooms - sources}"
    assert containers.missing_sources(containers.project_root()) == []
    assert containers.missing_sources(ROOT) == []


def test_image_build_context_installs_the_packaged_broker_config(
    containers: ModuleType, tmp_path: Path
) -> None:
    """What the Dockerfile copies (links kept, as Docker does) builds every package,
    and the installed cipherface.testing carries mosquitto.conf as a real file."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for pattern in containers.dockerfile_sources((ROOT / "Dockerfile").read_text()):
        for src in ROOT.glob(pattern):
            dst = ctx / src.name
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(
                    src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(src, dst, follow_symlinks=False)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "-q",
            "build_py",
            "-d",
            "lib",
        ],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    packaged = ctx / "lib" / "cipherface" / "testing" / "mosquitto.conf"
    assert not packaged.is_symlink()
    assert packaged.read_text() == (ROOT / "mosquitto.conf").read_text()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name in cfg["tool"]["setuptools"]["packages"]:
        assert (ctx / "lib" / Path(*name.split(".")) / "__init__.py").is_file(), name


def test_missing_build_context_is_reported(containers: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "Dockerfile").write_text(
        "FROM x\nCOPY --chown=1 pyproject.toml README.md* ./\nCOPY agents ./agents\n"
        "COPY crypto ./crypto\n"
    )
    assert containers.missing_sources(tmp_path) == ["pyproject.toml", "crypto"]


def test_secure_container_config_maps_the_secrets(containers: ModuleType) -> None:
    text = containers.container_config(profile="secure", tls=True)
    lines = set(text.splitlines())
    for line in (
        "password_file /mosquitto/secrets/passwd",
        "acl_file /mosquitto/secrets/acl",
        "cafile /mosquitto/secrets/ca.crt",
        "keyfile /mosquitto/secrets/server.key",
        "listener 8883 0.0.0.0",
        "listener 1883 0.0.0.0",
        "persistence_location /mosquitto/data/",
        "log_dest stderr",
    ):
        assert line in lines, line
    assert "allow_anonymous true" not in lines
    assert "use_username_as_clientid true" in lines


def test_container_config_runs_on_mosquitto(containers: ModuleType, tmp_path: Path) -> None:
    """The very text the container gets, with its port and data path moved here."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs the mosquitto binary")
    port = free_port()
    text = containers.container_config()
    assert "listener 1883 0.0.0.0" in text and "allow_anonymous true" in text
    local = (
        text.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
        .replace("/mosquitto/data/", f"{tmp_path}/")
        .replace("user root\n", "user root\n" if _is_root() else "")
    )
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(local)
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        seen = _read_until(proc, containers._MOSQUITTO_READY, timeout=10)
        assert containers._MOSQUITTO_READY.search(seen), seen  # the wait strategy's line
        _publish(f"mqtt://127.0.0.1:{port}", "probe", b"x")  # anonymous connect works
    finally:
        proc.terminate()
        proc.wait(10)


def _read_until(proc: subprocess.Popen[bytes], pattern: re.Pattern[str], timeout: float) -> str:
    """What ``proc`` wrote on stderr until ``pattern`` showed up (or ``timeout``)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = ""
    deadline = time.monotonic() + timeout
    while not pattern.search(seen):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        seen += chunk.decode("utf-8", "replace")
    return seen


def _is_root() -> bool:
    return os.geteuid() == 0


def test_cloud_container_command_serves(
    containers: ModuleType,
    cipherface_broker: Broker,
    cipherface_keys_session: SiteKeys,
    tmp_path: Path,
) -> None:
    """Run the container's argv here (only ``--data`` moved): the agent must serve,
    and print the line the container's wait strategy looks for."""
    site = new_site_id()
    argv = containers.cloud_command(
        broker_url=cipherface_broker.url, data=str(tmp_path / "data"), sites=[site]
    )
    assert argv[:2] == ["cipherface", "cloud"]
    cli = [sys.executable, "-c", "from cipherface.agents.cli import main; main()", *argv[1:]]
    proc = subprocess.Popen(cli, stderr=subprocess.PIPE)
    try:
        line = _read_until(proc, containers._CLOUD_READY, timeout=90)
        assert containers._CLOUD_READY.search(line), line
        with open_edge(
            broker_url=cipherface_broker.url, keys=cipherface_keys_session, site=site
        ) as edge:
            edge.enroll("frank", embeddings=synthetic_vector("frank", 128))
            assert edge.verify("frank", vector=synthetic_vector("frank", 128)).match
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.skipif(
    not docker_available(), reason="needs a Docker engine (testcontainers): none answers here"
)
@pytest.mark.slow
def test_containers_end_to_end(containers: ModuleType, cipherface_keys_session: SiteKeys) -> None:
    from testcontainers.core.network import Network

    site = new_site_id()
    with (
        Network() as net,
        containers.MosquittoContainer(network=net) as broker,
        containers.CipherFaceCloudContainer(broker_url=broker.internal_url, network=net),
        open_edge(broker_url=broker.url, keys=cipherface_keys_session, site=site) as edge,
    ):
        edge.enroll("grace", embeddings=synthetic_vector("grace", 128))
        assert edge.verify("grace", vector=synthetic_vector("grace", 128)).match
