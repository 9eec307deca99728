"""Camera integrations (cipherface.cameras): policy and consensus, integrator JSON, Frigate
event parsing, Home Assistant discovery against HA's documented schema, Double Take
payloads, the config file, unknown-face retention, and the gateway on a real broker with
a real cloud agent (synthetic embeddings: the face model is exercised in
test_cameras_frigate.py).
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from vectors import near, unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.cameras import config as camcfg
from cipherface.cameras.bus import MqttBus
from cipherface.cameras.capture import Capture, Frame
from cipherface.cameras.decide import Policy, Tally
from cipherface.cameras.events import (
    EVENT_TYPES,
    IntegratorEvent,
    availability_topic,
    camera_topic,
    person_topic,
    slug,
    validate_camera,
)
from cipherface.cameras.gateway import Gateway
from cipherface.cameras.outputs.double_take import DoubleTakeOutput
from cipherface.cameras.outputs.homeassistant import HomeAssistantOutput
from cipherface.cameras.outputs.integrator import JsonEventsOutput
from cipherface.cameras.sources.folder import FolderSource
from cipherface.cameras.sources.frigate import FrigateSource, face_area
from cipherface.cameras.unknown import UnknownFaces
from cipherface.crypto import sites
from cipherface.errors import InvalidArgumentError, NoFaceError
from cipherface.protocol import decode, events_topic

DIM = 128
GW = "gw1"


def frigate_event(
    event_id: str, camera: str = "front", *, kind: str = "new", label: str = "person", **after: Any
) -> bytes:
    """A ``frigate/events`` payload with the fields of Frigate's documented MQTT API."""
    now = time.time()
    body = {
        "id": event_id,
        "camera": camera,
        "frame_time": now,
        "snapshot": {"frame_time": now, "box": [10, 10, 200, 400], "area": 76000, "score": 0.8},
        "label": label,
        "sub_label": None,
        "top_score": 0.8,
        "false_positive": False,
        "start_time": now - 0.5,
        "end_time": None,
        "score": 0.8,
        "box": [10, 10, 200, 400],
        "area": 76000,
        "region": [0, 0, 320, 320],
        "current_zones": ["porch"],
        "entered_zones": ["porch"],
        "has_snapshot": True,
        "has_clip": False,
        "current_attributes": [{"label": "face", "box": [50, 40, 110, 120], "score": 0.9}],
    }
    body.update(after)
    return json.dumps({"type": kind, "before": body, "after": body}).encode()


# ---------------------------------------------------------------- pure parts
def test_slug_keeps_topic_levels_safe_and_distinct() -> None:
    assert slug("alice") == "alice"
    odd = [slug(s) for s in ("Alice", "alice/#", "alice +", "Zoë Ö")]
    assert all(re.fullmatch(r"[a-z0-9_-]+", s) for s in odd)
    assert len(set(odd)) == len(odd)
    with pytest.raises(InvalidArgumentError):
        validate_camera("front/door")
    assert validate_camera("Front_Door-2") == "Front_Door-2"


def test_integrator_event_round_trips_as_flat_json() -> None:
    ev = IntegratorEvent(
        event_type="match",
        site="home",
        gateway="gw1",
        camera="front",
        event_id="1700000000.1-abc",
        source="frigate",
        identity="alice",
        match=True,
        confidence=0.67,
        captured_at="2026-11-29T14:00:00.000Z",
        decided_at="2026-11-29T14:00:00.250Z",
        expires_at="2026-11-29T14:00:10.250Z",
        latency_ms=250.0,
        frames=3,
        face_box=(120, 64, 180, 182),
    )
    obj = json.loads(ev.to_json())
    # flat but for the face box, an [x, y, width, height] array
    assert all(not isinstance(v, dict | list) for k, v in obj.items() if k != "face_box")
    assert obj["face_box"] == [120, 64, 180, 182]
    for key in (
        "site",
        "gateway",
        "camera",
        "event_id",
        "op",
        "identity",
        "match",
        "confidence",
        "captured_at",
        "decided_at",
        "expires_at",
        "latency_ms",
        "error",
    ):
        assert key in obj
    assert IntegratorEvent.from_json(ev.to_json()) == ev
    assert "MATCH alice" in ev.describe()
    with pytest.raises(InvalidArgumentError):
        IntegratorEvent.from_json(b'{"event_type": "unlock"}')
    for bad_box in ([1, 2, 3], [1, 2, 3, -4], [1, 2, 3.5, 4], "1,2,3,4", {"x": 1}):
        with pytest.raises(InvalidArgumentError, match="face_box"):
            IntegratorEvent.from_json(json.dumps({**obj, "face_box": bad_box}))


def test_tally_thresholds_consensus_and_coarse_confidence() -> None:
    policy = Policy(consensus=2, attempts=4, match_distance=0.07, unknown_distance=0.12)
    m, u = policy.limits("Dlib", "cosine")
    t = Tally(match_distance=m, unknown_distance=u, consensus=2, metric="cosine")
    t.add_face("alice", 1 - 0.05, (10, 10, 90, 90))  # match vote
    assert not t.settled
    t.add_face("alice", 1 - 0.10, (0, 0, 5, 5))  # uncertain: no vote
    t.add_face("alice", 1 - 0.0301234, (12, 11, 88, 91))  # second vote
    assert t.settled
    v = t.verdict()
    assert (v.event_type, v.identity, v.confidence) == ("match", "alice", 0.67)
    assert v.box == (12, 11, 88, 91)  # the last frame that voted for her, not the doubtful one
    # The confidence is votes/faces: no digit of any similarity gets through.
    assert v.confidence == round(2 / 3, 2)

    t2 = Tally(match_distance=m, unknown_distance=u, consensus=1, metric="cosine")
    t2.add_face("bob", 1 - 0.5, (3, 4, 50, 60))
    t2.add_face("bob", 1 - 0.6)  # a face whose box nobody reported
    assert t2.verdict().event_type == "unknown" and t2.verdict().confidence is None
    assert t2.verdict().box == (3, 4, 50, 60)
    t3 = Tally(match_distance=m, unknown_distance=u, consensus=1, metric="cosine")
    t3.add_failure("no_face", "no face detected in front/latest")
    assert (t3.verdict().event_type, t3.verdict().error) == ("error", "no_face")
    assert Policy().limits("Dlib", "cosine") == (0.07, 0.07)
    for bad in ({"consensus": 3, "attempts": 2}, {"attempts": 0}, {"max_age_s": 0}):
        with pytest.raises(InvalidArgumentError):
            Policy(**bad)
    with pytest.raises(InvalidArgumentError):
        Policy(match_distance=0.1, unknown_distance=0.05).limits("Dlib", "cosine")


def test_frigate_events_are_filtered_and_deduplicated() -> None:
    src = FrigateSource(url="http://frigate:5000")
    first = src.parse(frigate_event("e1"))
    assert first is not None and first.camera == "front" and first.event_id == "e1"
    assert src.parse(frigate_event("e1", kind="update")) is None  # same after.id
    assert src.parse(frigate_event("e2", kind="end")) is None
    assert src.parse(frigate_event("e3", label="car")) is None
    assert src.parse(frigate_event("e4", sub_label=["Bob", 0.8])) is None  # already named
    assert src.parse(frigate_event("e5", kind="update")) is not None
    assert src.parse(b"{not json") is None
    assert src.parse(frigate_event("e6", camera="bad/camera")) is None
    # An id from the broker never walks Frigate's API.
    for evil in ("../../api/config", "a/b", "..", ".", "x" * 65, "a?b=1", "a..b"):
        assert src.parse(frigate_event(evil)) is None
    assert face_area({"current_attributes": [{"label": "face", "box": [0, 0, 10, 20]}]}) == 200
    # A later update with a newer snapshot gets a second chance when the first capture
    # ended without a match; never while busy, never after a match, at most twice.
    assert first.done is not None
    first.done(None)  # finished (e.g. unknown)
    newer = time.time() + 5
    snap = {"frame_time": newer}
    second = src.parse(frigate_event("e1", kind="update", snapshot=snap))
    assert second is not None and second.captured_at == newer
    assert src.parse(frigate_event("e1", kind="update", snapshot={"frame_time": newer + 1})) is None
    assert second.done is not None
    second.done(None)
    assert src.parse(frigate_event("e1", kind="update", snapshot={"frame_time": newer + 2})) is None
    matched = src.parse(frigate_event("m1"))
    assert matched is not None and matched.done is not None
    matched.done(
        IntegratorEvent(
            event_type="match",
            site="s",
            gateway="g",
            camera="front",
            event_id="m1",
            source="frigate",
            identity="a",
            match=True,
            confidence=1.0,
            captured_at="x",
            decided_at="x",
            expires_at="x",
            latency_ms=1.0,
            frames=1,
        )
    )
    assert src.parse(frigate_event("m1", kind="update", snapshot={"frame_time": newer})) is None
    only = FrigateSource(url="http://frigate:5000", cameras=["back"])
    assert only.parse(frigate_event("e7")) is None


# Home Assistant's documented MQTT discovery schema (home-assistant.io/integrations/
# event.mqtt, binary_sensor.mqtt, sensor.mqtt, mqtt/#discovery-messages), as far as we
# use it: the keys each platform accepts, the required ones and their types.
HA_COMMON = {
    "name": str,
    "unique_id": str,
    "availability_topic": str,
    "payload_available": str,
    "payload_not_available": str,
    "qos": int,
    "device": dict,
    "origin": dict,
    "icon": str,
    "json_attributes_topic": str,
    "value_template": str,
}
HA_SCHEMA: dict[str, tuple[dict[str, type], set[str]]] = {
    "event": (
        {**HA_COMMON, "state_topic": str, "event_types": list, "device_class": str},
        {"state_topic", "event_types"},
    ),
    "binary_sensor": (
        {
            **HA_COMMON,
            "state_topic": str,
            "device_class": str,
            "payload_on": str,
            "payload_off": str,
            "off_delay": int,
            "expire_after": int,
        },
        {"state_topic"},
    ),
    "sensor": (
        {
            **HA_COMMON,
            "state_topic": str,
            "device_class": str,
            "expire_after": int,
            "unit_of_measurement": str,
        },
        {"state_topic"},
    ),
}
HA_DEVICE_KEYS = {
    "identifiers",
    "connections",
    "name",
    "manufacturer",
    "model",
    "sw_version",
    "hw_version",
    "configuration_url",
    "suggested_area",
    "via_device",
}
HA_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
BINARY_SENSOR_CLASSES = {"presence", "occupancy", "motion", "connectivity"}


def check_ha_config(topic: str, config: dict[str, Any], prefix: str = "homeassistant") -> str:
    """Check one discovery message field by field; returns its component."""
    parts = topic.split("/")
    assert parts[0] == prefix and parts[-1] == "config" and len(parts) in (4, 5), topic
    component = parts[1]
    assert all(HA_ID.match(p) for p in parts[2:-1]), topic  # node_id, object_id
    allowed, required = HA_SCHEMA[component]
    assert required <= set(config), (topic, required - set(config))
    for key, value in config.items():
        assert key in allowed, f"{topic}: {key} is not in HA's {component} schema"
        assert isinstance(value, allowed[key]), (topic, key, value)
    assert config["qos"] in (0, 1, 2)
    assert set(config["device"]) <= HA_DEVICE_KEYS
    assert config["device"]["identifiers"], "a device needs identifiers or connections"
    assert "unique_id" in config  # device registry only works with a unique_id
    assert "availability" not in config  # never together with availability_topic
    for key in ("off_delay", "expire_after"):
        if key in config:
            assert config[key] > 0
    if component == "event":
        assert config["event_types"] and all(isinstance(t, str) for t in config["event_types"])
        assert config.get("device_class") in (None, "button", "doorbell", "motion")
    if component == "binary_sensor" and "device_class" in config:
        assert config["device_class"] in BINARY_SENSOR_CLASSES
    assert config["name"] and config["origin"]["name"]
    return component


def test_home_assistant_discovery_matches_the_documented_schema() -> None:
    ha = HomeAssistantOutput(
        site="home", gateway="gw-1", cameras=["front"], people=["alice", "Zoë/Ö"], presence_s=90
    )
    configs = ha.configs()
    components = [check_ha_config(t, c) for t, c in configs]
    assert components.count("event") == 1
    assert components.count("binary_sensor") == 2 and components.count("sensor") == 2
    topic, event = configs[0]
    assert topic == "homeassistant/event/cipherface_home_gw_1/front_face/config"
    assert event["event_types"] == list(EVENT_TYPES) == ["match", "unknown", "stale", "error"]
    assert event["state_topic"] == camera_topic("home", "gw-1", "front")
    assert event["availability_topic"] == availability_topic("home", "gw-1")
    assert (event["payload_available"], event["payload_not_available"]) == ("online", "offline")
    presence = dict(configs)[
        "homeassistant/binary_sensor/cipherface_home_gw_1/alice_presence/config"
    ]
    assert presence["state_topic"] == person_topic("home", "gw-1", "alice")
    assert presence["off_delay"] == 90 and presence["device_class"] == "presence"
    last = dict(configs)["homeassistant/sensor/cipherface_home_gw_1/alice_camera/config"]
    assert last["expire_after"] == 90
    assert len({c["unique_id"] for _, c in configs}) == len(configs)


def test_double_take_payloads_have_double_takes_fields() -> None:
    out = DoubleTakeOutput()
    cap = Capture(
        camera="front",
        event_id="e1",
        source="frigate",
        captured_at=time.time(),
        frames=lambda: iter(()),
        extra={"zones": ["porch"]},
    )
    base = dict(
        site="home",
        gateway="gw1",
        camera="front",
        event_id="e1",
        source="frigate",
        captured_at="x",
        decided_at="2026-11-29T14:00:00.000Z",
        expires_at="x",
        latency_ms=320.0,
        frames=2,
    )
    match = IntegratorEvent(
        event_type="match",
        identity="alice",
        match=True,
        confidence=1.0,
        face_box=(152, 281, 290, 291),
        **base,
    )
    (t1, p1), (t2, p2) = out.payloads(match, cap)
    assert t1 == "double-take/matches/alice" and t2 == "double-take/cameras/front"
    for key in ("id", "duration", "timestamp", "attempts", "camera", "zones", "match"):
        assert key in p1
    assert set(p1["match"]) == {
        "name",
        "confidence",
        "match",
        "box",
        "type",
        "duration",
        "detector",
        "filename",
    }
    assert p1["match"]["confidence"] == 100.0 and p1["attempts"] == 2
    # Double Take's box: top/left/width/height of the face in the examined frame.
    box = {"top": 281, "left": 152, "width": 290, "height": 291}
    assert p1["match"]["box"] == box and p2["matches"][0]["box"] == box
    assert p2["counts"] == {"person": 1, "match": 1, "miss": 0, "unknown": 0}
    unknown = IntegratorEvent(
        event_type="unknown", identity=None, match=False, confidence=None, **base
    )
    (t3, p3), (_, p4) = out.payloads(unknown, cap)
    assert t3 == "double-take/matches/unknown" and p3["match"]["name"] == "unknown"
    # No box reported (an embedder without represent_face): zeros, as before.
    assert p3["match"]["box"] == {"top": 0, "left": 0, "width": 0, "height": 0}
    assert p4["unknowns"] and not p4["matches"]
    stale = IntegratorEvent(
        event_type="stale", identity=None, match=False, confidence=None, error="stale", **base
    )
    assert out.payloads(stale, cap) == []


def test_config_file_with_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
site = "home"
gateway = "gw1"
keys = "/keys"
[cloud]
url = "mqtt://cloud.example:1883"
[mqtt]
url = "mqtt://lan:1883"
[defaults]
max_age_s = 4.0
attempts = 3
[cameras.front]
consensus = 2
match_distance = 0.06
[frigate]
url = "http://frigate:5000"
[double_take]
enabled = true
[homeassistant]
people = ["alice"]
[unknown_faces]
path = "%s"
retention_days = 2
[[sources]]
type = "opencv"
camera = "porch"
url = "rtsp://cam/stream"
[[sources]]
type = "mqtt_jpeg"
topic = "frigate/+/person/snapshot"
"""
        % (tmp_path / "unknown")
    )
    env = {
        "CIPHERFACE__MQTT__PASSWORD": "s3cret",
        "CIPHERFACE__MQTT__USERNAME": "gw",
        "CIPHERFACE__DEFAULTS__TTL_S": "7.5",
        "CIPHERFACE_SITE": "ignored",
    }
    cfg = camcfg.load(path, env)
    assert (cfg.site, cfg.gateway, cfg.keys) == ("home", "gw1", "/keys")
    assert cfg.cloud.url == "mqtt://cloud.example:1883"
    assert (cfg.mqtt.url, cfg.mqtt.username, cfg.mqtt.password) == (
        "mqtt://lan:1883",
        "gw",
        "s3cret",
    )
    assert cfg.defaults.ttl_s == 7.5 and cfg.defaults.max_age_s == 4.0
    front = cfg.cameras["front"]
    assert (front.consensus, front.match_distance, front.max_age_s) == (2, 0.06, 4.0)
    assert [s.name for s in cfg.sources()] == [
        "frigate",
        "opencv:porch",
        "mqtt:frigate/+/person/snapshot",
    ]
    assert [o.name for o in cfg.outputs()] == ["json", "frigate", "double-take", "homeassistant"]
    assert cfg.unknown_faces() is not None
    with pytest.raises(InvalidArgumentError, match="keys"):
        camcfg.parse({"site": "a", "gateway": "b"}, {})
    with pytest.raises(InvalidArgumentError, match="unknown keys"):
        camcfg.parse({"site": "a", "gateway": "b", "keys": "k", "defaults": {"treshold": 1}}, {})
    with pytest.raises(InvalidArgumentError, match="type"):
        camcfg.parse(
            {"site": "a", "gateway": "b", "keys": "k", "sources": [{"type": "x"}]}, {}
        ).sources()


def test_unknown_faces_are_private_and_retention_limited(tmp_path: Path) -> None:
    keeper = UnknownFaces(path=tmp_path / "unknown", retention_s=60, max_files=2)
    files = [keeper.keep(b"\xff\xd8jpeg%d" % i, camera="front") for i in range(3)]
    assert all(f is not None for f in files)
    left = sorted((tmp_path / "unknown").iterdir())
    assert len(left) == 2  # the oldest went
    assert (tmp_path / "unknown").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in left)
    old = time.time() - 3600
    os.utime(left[0], (old, old))
    assert keeper.prune() == 1


# ------------------------------------------------------- gateway on a real broker
#: docs/integrations.md, "The integrator event".
DOCUMENTED_FIELDS = {
    "event_type",
    "site",
    "gateway",
    "camera",
    "event_id",
    "source",
    "op",
    "identity",
    "match",
    "confidence",
    "captured_at",
    "decided_at",
    "expires_at",
    "latency_ms",
    "frames",
    "face_box",
    "error",
    "message",
}


class StubEmbedder:
    """Maps a frame's label to a vector (the face model is tested elsewhere)."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def represent(self, photo: Any, *, name: str | None = None) -> np.ndarray:
        key = Path(name or str(photo)).stem
        if key not in self.vectors:
            raise NoFaceError(f"no face detected in {name}")
        return self.vectors[key]


class Listener:
    """A plain paho client recording every message on its filters (retain flag kept)."""

    def __init__(self, url: str, filters: list[str]) -> None:
        cfg = BrokerConfig(url=url)
        self.q: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"listen-{secrets.token_hex(4)}",
            protocol=paho.MQTTv5,
        )
        ok = threading.Event()
        self.client.on_message = lambda c, u, m: self.q.put(m)
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert ok.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def until(self, pred: Any, timeout: float = 20.0) -> paho.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if pred(msg):
                return msg

    def drain(self, wait: float = 0.3) -> list[paho.MQTTMessage]:
        time.sleep(wait)
        out = []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def stack(broker: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real cloud agent and an edge client for a site of this test's own."""
    site = f"t{secrets.token_hex(4)}"
    keys = tmp_path / "keys"
    sites.generate_key_dir(keys, dim=DIM)
    cloud = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
    )
    cloud.start()
    rng = np.random.default_rng(secrets.randbits(32))
    alice, stranger = unit(rng, 2)
    edge = EdgeClient(
        broker=BrokerConfig(url=broker.url),
        cipher=sites.load_edge_cipher(keys),
        site=site,
        gateway=GW,
        timeout=10.0,
        embedder=StubEmbedder({"alice-door": near(alice, rng), "stranger": stranger}),
    )
    edge.start()
    edge.enroll("alice", embeddings=alice)
    try:
        yield {"site": site, "edge": edge, "broker": broker}
    finally:
        edge.close()
        cloud.stop(retire=True)


def test_folder_gateway_publishes_integrator_json(stack: dict[str, Any], tmp_path: Path) -> None:
    site, edge, broker = stack["site"], stack["edge"], stack["broker"]
    listener = Listener(broker.url, [f"cipherface/v1/{site}/#"])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("alice-door.jpg", "no-face.jpg", "stranger.png", "notes.txt", ".partial.jpg"):
        (inbox / name).write_bytes(b"not really an image")
    old = inbox / "stale.jpg"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    bus = MqttBus(
        broker=BrokerConfig(url=broker.url), availability_topic=availability_topic(site, GW)
    )
    bus.start()
    gw = Gateway(
        edge=edge,
        bus=bus,
        sources=[FolderSource(path=inbox, camera="door", poll=0.05, settle=0.0)],
        outputs=[JsonEventsOutput()],
        default_policy=Policy(attempts=1, max_age_s=30),
    )
    try:
        gw.start()
        deadline = time.monotonic() + 30
        while sum(gw.counts.values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gw.close()
        bus.close()
    msgs = listener.drain(0.5)
    listener.close()
    cam = camera_topic(site, GW, "door")
    events = {
        e.event_id: e
        for e in (IntegratorEvent.from_json(m.payload) for m in msgs if m.topic == cam)
    }
    assert events["alice-door.jpg"].event_type == "match"
    assert events["alice-door.jpg"].identity == "alice"
    assert events["alice-door.jpg"].confidence == 1.0
    # No decrypted value leaves the edge: the JSON holds the documented fields only and
    # no rendering of the similarity the gateway decrypted for this photo.
    _, similarity = edge.best_match(edge.embed("alice-door.jpg", label="alice-door.jpg"))
    payload = next(
        m.payload.decode() for m in msgs if b"alice-door.jpg" in m.payload and m.topic == cam
    )
    assert set(json.loads(payload)) == DOCUMENTED_FIELDS
    for digits in range(2, 8):
        assert f"{similarity:.{digits}f}" not in payload
        assert f"{1 - similarity:.{digits}f}" not in payload
    assert events["stranger.png"].event_type == "unknown"
    assert events["stranger.png"].identity is None
    assert (events["no-face.jpg"].event_type, events["no-face.jpg"].error) == ("error", "no_face")
    assert (events["stale.jpg"].event_type, events["stale.jpg"].frames) == ("stale", 0)
    assert str(inbox) not in json.dumps([e.to_dict() for e in events.values()])  # no paths
    # Never retained: a subscriber arriving now gets the availability and nothing else.
    late = Listener(broker.url, [f"cipherface/v1/{site}/json/#"])
    kept = late.drain(0.5)
    late.close()
    assert [(m.topic, m.payload, m.retain) for m in kept] == [
        (availability_topic(site, GW), b"offline", True)
    ]
    person = [m for m in msgs if m.topic == person_topic(site, GW, "alice")]
    assert len(person) == 1 and json.loads(person[0].payload)["camera"] == "door"
    # The protocol's msgpack decisions still go out for match and unknown.
    decisions = [decode(m.payload) for m in msgs if m.topic == events_topic(site, GW)]
    assert sorted(d.match for d in decisions) == [False, True]
    # Availability: retained online while running, offline after a clean stop.
    avail = [m.payload for m in msgs if m.topic == availability_topic(site, GW)]
    assert avail[0] == b"online" and avail[-1] == b"offline"
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["alice-door.jpg", "stranger.png"]
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["no-face.jpg", "stale.jpg"]
    assert (inbox / "notes.txt").exists() and (inbox / ".partial.jpg").exists()


def test_a_capture_that_goes_stale_during_the_work_is_never_decided(
    stack: dict[str, Any],
) -> None:
    edge = stack["edge"]
    published: list[IntegratorEvent] = []

    class Collect:
        name = "collect"

        def start(self, bus: Any) -> None: ...
        def publish(self, event: IntegratorEvent, capture: Capture) -> None:
            published.append(event)

        def close(self) -> None: ...

    def slow_frames() -> Iterator[Frame]:
        time.sleep(1.2)  # a slow camera: by the time the frame is there, it is too late
        yield Frame(image=b"x", label="alice-door")

    gw = Gateway(
        edge=edge,
        bus=None,
        outputs=[Collect()],  # type: ignore[arg-type]
        default_policy=Policy(attempts=1, max_age_s=1.0),
    )
    cap = Capture(
        camera="door",
        event_id="late",
        source="frigate",
        captured_at=time.time(),
        frames=slow_frames,
    )
    event = gw.handle(cap)
    assert event is not None and event.event_type == "stale" and event.identity is None
    assert published == [event] and not event.match


def test_broker_acl_lets_a_gateway_publish_only_its_own_integrator_json(
    secure_broker: Any, secure_deployment: Any
) -> None:
    """On the project's mosquitto.conf: a gateway writes its own json/ topics only; the
    site's integrator reads them; nothing crosses sites."""
    from cipherface.agents.deploy import Account

    rules = {(r.access, r.topic) for r in Account.for_gateway("site-a", "gw1").acl_rules()}
    assert ("write", "cipherface/v1/site-a/json/gw1/#") in rules
    integrator = {(r.access, r.topic) for r in Account.for_integrator("site-a").acl_rules()}
    assert ("read", "cipherface/v1/site-a/json/#") in integrator

    def client(username: str) -> paho.Client:
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=username,
            protocol=paho.MQTTv5,
        )
        c.username_pw_set(username, secure_deployment.password(username))
        c.connect("127.0.0.1", secure_broker.port)
        c.loop_start()
        return c

    got: queue.Queue[str] = queue.Queue()
    reader = client("site-a@integrator")
    ok = threading.Event()
    reader.on_message = lambda c, u, m: got.put(m.topic)
    reader.on_subscribe = lambda *a: ok.set()
    reader.subscribe([("cipherface/v1/+/json/#", 1)])
    assert ok.wait(5)
    writer = client("site-a.gw1")
    try:
        for topic in (
            camera_topic("site-a", "gw1", "front"),  # its own
            camera_topic("site-a", "gw2", "front"),  # its neighbour's
            camera_topic("site-b", "gw1", "front"),  # another site's
            person_topic("site-a", "gw1", "alice"),
        ):  # its own
            writer.publish(topic, b"{}", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        seen = set()
        while not got.empty():
            seen.add(got.get_nowait())
        assert seen == {
            camera_topic("site-a", "gw1", "front"),
            person_topic("site-a", "gw1", "alice"),
        }
    finally:
        for c in (reader, writer):
            c.disconnect()
            c.loop_stop()


def test_jpeg_topic_source_ignores_retained_snapshots(stack: dict[str, Any]) -> None:
    from cipherface.cameras.sources.mqtt_jpeg import MqttJpegSource

    site, edge, broker = stack["site"], stack["edge"], stack["broker"]
    edge._embedder.vectors["mqtt"] = edge._embedder.vectors["alice-door"]
    topic = f"{site}-frigate/+/person/snapshot"
    pub = Listener(broker.url, [f"cipherface/v1/{site}/json/{GW}/events/+"])
    # A retained snapshot from before the gateway started: an old sighting, not a new one.
    pub.publish(f"{site}-frigate/garden/person/snapshot", b"\xff\xd8old", retain=True)
    bus = MqttBus(
        broker=BrokerConfig(url=broker.url), availability_topic=availability_topic(site, GW)
    )
    bus.start()
    gw = Gateway(
        edge=edge,
        bus=bus,
        sources=[MqttJpegSource(topic=topic, camera_level=1)],
        outputs=[JsonEventsOutput()],
        default_policy=Policy(attempts=1),
    )
    try:
        gw.start()
        pub.publish(f"{site}-frigate/porch/person/snapshot", b"\xff\xd8new")
        msg = pub.until(lambda m: m.topic.endswith("/porch"), 20)
        ev = IntegratorEvent.from_json(msg.payload)
        assert (ev.event_type, ev.identity, ev.source, ev.camera) == (
            "match",
            "alice",
            "mqtt",
            "porch",
        )
        assert not [m for m in pub.drain(0.5) if m.topic.endswith("/garden")]
        assert gw.counts == {"match": 1}
    finally:
        gw.close()
        bus.close()
        pub.publish(f"{site}-frigate/garden/person/snapshot", b"", retain=True)
        pub.close()


def test_cipherface_events_prints_the_live_stream(broker: Any) -> None:
    import io

    from cipherface.cameras.cli import stream_events

    site = f"t{secrets.token_hex(4)}"
    base = dict(
        site=site,
        gateway=GW,
        camera="front",
        source="frigate",
        captured_at="x",
        decided_at="2026-11-29T14:06:41.874Z",
        expires_at="x",
        latency_ms=354.2,
        frames=1,
    )
    events = [
        IntegratorEvent(
            event_type="match", event_id="a", identity="alice", match=True, confidence=1.0, **base
        ),
        IntegratorEvent(
            event_type="match", event_id="b", identity="bob", match=True, confidence=0.5, **base
        ),
        IntegratorEvent(
            event_type="stale",
            event_id="c",
            identity=None,
            match=False,
            confidence=None,
            error="stale",
            **base,
        ),
    ]
    for as_json, person, want in ((False, None, 3), (True, "alice", 1)):
        out = io.StringIO()
        stop = threading.Event()
        t = threading.Thread(
            target=stream_events,
            kwargs=dict(
                broker=BrokerConfig(url=broker.url),
                site=site,
                person=person,
                as_json=as_json,
                count=want,
                stop=stop,
                out=out,
            ),
        )
        t.start()
        time.sleep(0.5)  # subscribed
        pub = Listener(broker.url, ["unused/#"])
        for ev in events:
            pub.publish(camera_topic(site, GW, "front"), ev.to_json())
        pub.publish(camera_topic(site, GW, "front"), b"not json")  # skipped, not fatal
        t.join(10)
        stop.set()
        pub.close()
        lines = out.getvalue().splitlines()
        assert len(lines) == want
        if as_json:
            assert IntegratorEvent.from_json(lines[0]) == events[0]
        else:
            assert "MATCH alice (confidence 1.0)" in lines[0] and "gw1/front" in lines[0]
            assert "stale capture dropped" in lines[2]


def test_cloud_trouble_keeps_a_folder_photo_and_reports_a_camera_capture(
    stack: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cipherface.errors import PeerReportedError, RequestTimeoutError

    edge = stack["edge"]
    published: list[IntegratorEvent] = []

    class Collect:
        name = "collect"

        def start(self, bus: Any) -> None: ...
        def publish(self, event: IntegratorEvent, capture: Capture) -> None:
            published.append(event)

        def close(self) -> None: ...

    gw = Gateway(
        edge=edge,
        bus=None,
        outputs=[Collect()],  # type: ignore[arg-type]
        default_policy=Policy(attempts=1, max_age_s=30),
    )
    inbox = tmp_path / "inbox"
    src = FolderSource(path=inbox, camera="door", settle=0.0)
    for d in (inbox, src.done_dir, src.failed_dir):
        d.mkdir(parents=True, exist_ok=True)
    (inbox / "alice-door.jpg").write_bytes(b"x")
    got: list[Capture] = []
    ctx_stop = threading.Event()
    from cipherface.cameras.capture import SourceContext

    ctx = SourceContext(emit=got.append, bus=None, stop=ctx_stop)  # type: ignore[arg-type]
    for exc in (
        PeerReportedError("error", "internal error", retry=True),
        RequestTimeoutError("no reply"),
    ):

        def boom(*a: Any, _exc: Exception = exc, **k: Any) -> Any:
            raise _exc

        monkeypatch.setattr(edge, "best_match", boom)
        got.clear()
        assert src.scan(ctx) == 1
        assert src.scan(ctx) == 0  # in flight: not emitted twice
        assert gw.handle(got[0]) is None  # kept for the next scan, nothing published
        assert (inbox / "alice-door.jpg").exists() and not list(src.failed_dir.iterdir())
        # The same trouble on a camera capture is reported (a camera has no "later").
        cap = Capture(
            camera="front",
            event_id="e1",
            source="frigate",
            captured_at=time.time(),
            frames=lambda: iter([Frame(image=b"x", label="alice-door")]),
        )
        ev = gw.handle(cap)
        assert ev is not None and ev.event_type == "error" and ev.identity is None
        assert ev.error == ("error" if isinstance(exc, PeerReportedError) else "timeout")
    assert [e.event_type for e in published] == ["error", "error"]
