"""End to end with real faces: Frigate-style events -> snapshots over HTTP -> Dlib embedding
-> encrypted identify over the broker -> integrator JSON + Frigate sub_label write-back +
Home Assistant event + Double Take topics; and RTSP / video frames through OpenCV.

The Frigate stand-in (:mod:`cipherface.cameras.frigate_standin`) serves Frigate's real HTTP
paths from the real photos of .ci/setup_data.sh and publishes Frigate-format events on the
real broker of the ``broker`` fixture. The RTSP test streams a photo from GStreamer's RTSP
server (Debian packages, see tests/rtsp_standin.py); without them it is skipped, and the
video-file test takes the same OpenCV path.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cameras import Listener, check_ha_config

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.cameras.bus import MqttBus
from cipherface.cameras.decide import Policy
from cipherface.cameras.events import (
    EVENT_TYPES,
    IntegratorEvent,
    availability_topic,
    camera_topic,
    person_topic,
)
from cipherface.cameras.frigate_standin import FrigateStandin
from cipherface.cameras.gateway import Gateway
from cipherface.cameras.outputs.double_take import DoubleTakeOutput
from cipherface.cameras.outputs.frigate import FrigateSubLabelOutput
from cipherface.cameras.outputs.homeassistant import HomeAssistantOutput
from cipherface.cameras.outputs.integrator import JsonEventsOutput
from cipherface.cameras.sources.frigate import FrigateSource
from cipherface.cameras.sources.mqtt_jpeg import MqttJpegSource
from cipherface.cameras.sources.opencv import OpenCVSource
from cipherface.crypto import sites
from cipherface.crypto.guard import load_guard
from cipherface.errors import LocalError

pytestmark = [pytest.mark.faces]
GW = "gw1"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    try:
        from cipherface.faces import Embedder, find_photos

        Embedder().check_weights()
        return find_photos(["obama", "obama2", "obama3", "biden", "astronaut"])
    except (LocalError, ImportError) as exc:
        pytest.skip(f"needs the edge extra and .ci/setup_data.sh: {exc}")


@pytest.fixture(scope="module")
def real(broker: Any, photos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A cloud agent and an edge client with the real Dlib model; obama and biden enrolled."""
    tmp = tmp_path_factory.mktemp("cams")
    site = f"t{secrets.token_hex(4)}"
    keys = tmp / "keys"
    sites.generate_key_dir(keys, dim=128)
    cloud = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
    )
    cloud.start()
    cipher = sites.load_edge_cipher(keys)
    edge = EdgeClient(
        broker=BrokerConfig(url=broker.url),
        cipher=cipher,
        guard=load_guard(keys, cipher),  # as the CLI does: sealed names, canaries
        site=site,
        gateway=GW,
        timeout=15.0,
    )
    edge.start()
    try:
        edge.embedder.warmup()
        edge.enroll("obama", [photos["obama"]])
        edge.enroll("biden", [photos["biden"]])
        yield {"site": site, "edge": edge, "broker": broker, "keys": keys}
    finally:
        edge.close()
        cloud.stop(retire=True)


@pytest.fixture
def gateway_for(real: dict[str, Any]) -> Iterator[Any]:
    made: list[tuple[Gateway, MqttBus]] = []

    def make(**kw: Any) -> Gateway:
        bus = MqttBus(
            broker=BrokerConfig(url=real["broker"].url),
            availability_topic=availability_topic(real["site"], GW),
        )
        bus.start()
        gw = Gateway(edge=real["edge"], bus=bus, **kw)
        gw.start()
        made.append((gw, bus))
        return gw

    yield make
    for gw, bus in made:
        gw.close()
        bus.close()


def wait_counts(gw: Gateway, total: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(gw.counts.values()) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(gw.counts.values()) >= total, gw.counts


def test_frigate_event_to_decision_sub_label_home_assistant_and_double_take(
    real: dict[str, Any], photos: dict[str, Path], gateway_for: Any
) -> None:
    site, broker = real["site"], real["broker"]
    frigate = FrigateStandin(broker_url=broker.url, topic_prefix=f"frigate-{site}").start()
    listener = Listener(broker.url, [f"cipherface/v1/{site}/#", f"ha-{site}/#", f"dt-{site}/#"])
    ha = HomeAssistantOutput(
        site=site, gateway=GW, cameras=["front"], people=["obama"], discovery_prefix=f"ha-{site}"
    )
    sub_label = FrigateSubLabelOutput(url=frigate.url)
    try:
        gw = gateway_for(
            sources=[
                FrigateSource(url=frigate.url, topic_prefix=f"frigate-{site}", snapshot_height=500)
            ],
            outputs=[
                JsonEventsOutput(),
                sub_label,
                ha,
                DoubleTakeOutput(topic_prefix=f"dt-{site}"),
            ],
            default_policy=Policy(attempts=2, attempt_interval_s=0.05, max_age_s=20),
        )
        frigate.latest["back"] = photos["astronaut"].read_bytes()
        ids = {
            "obama2": frigate.person_event("front", photos["obama2"].read_bytes()),
            "obama3": frigate.person_event("front", photos["obama3"].read_bytes()),
            "biden": frigate.person_event("side", photos["biden"].read_bytes()),
            "stranger": frigate.person_event("back", photos["astronaut"].read_bytes()),
            "stale": frigate.person_event(
                "front", photos["obama2"].read_bytes(), frame_time=time.time() - 120
            ),
        }
        # An update of a known event and an end are not new captures.
        frigate.person_event(
            "front", photos["obama2"].read_bytes(), event_id=ids["obama2"], kind="update"
        )
        frigate.person_event(
            "front", photos["obama2"].read_bytes(), event_id=ids["obama3"], kind="end"
        )
        wait_counts(gw, 5)
        time.sleep(0.3)
        msgs = listener.drain(0.5)
        events = {
            e.event_id: e
            for e in (
                IntegratorEvent.from_json(m.payload)
                for m in msgs
                if "/json/" in m.topic and "/events/" in m.topic
            )
        }
        assert len(events) == 5 and gw.counts == {"match": 3, "unknown": 1, "stale": 1}
        for key, who in (("obama2", "obama"), ("obama3", "obama"), ("biden", "biden")):
            ev = events[ids[key]]
            assert (ev.event_type, ev.identity, ev.match) == ("match", who, True), ev
            assert ev.confidence == 1.0 and ev.frames == 1  # early stop at the first match
            assert ev.source == "frigate" and ev.error is None
        stranger = events[ids["stranger"]]
        assert (stranger.event_type, stranger.identity, stranger.match) == ("unknown", None, False)
        assert stranger.frames == 2  # the snapshot, then the camera's latest frame
        stale = events[ids["stale"]]
        assert (stale.event_type, stale.identity, stale.match, stale.error) == (
            "stale",
            None,
            False,
            "stale",
        )
        assert stale.frames == 0  # not even fetched

        # Frigate: names written back on the matched events only, with its field names.
        labels = dict(frigate.sub_labels)
        assert set(labels) == {ids["obama2"], ids["obama3"], ids["biden"]}
        assert labels[ids["obama2"]] == {
            "subLabel": "obama",
            "subLabelScore": 1.0,
            "camera": "front",
        }
        snaps = [r for r in frigate.requests if "snapshot.jpg" in r]
        assert all("crop=1" in r and "h=500" in r for r in snaps)
        assert "/api/back/latest.jpg?h=500" in frigate.requests
        assert not any(ids["stale"] in r for r in frigate.requests)

        # Home Assistant: discovery retained and valid; the event's JSON is an HA event.
        configs = [m for m in msgs if m.topic.startswith(f"ha-{site}/")]
        # A subscriber that comes later (Home Assistant restarting) gets the configs
        # retained, and no event at all: events are never retained.
        late = Listener(broker.url, [f"ha-{site}/#", f"cipherface/v1/{site}/json/#"])
        kept = late.drain(0.5)
        late.close()
        assert {m.topic for m in kept if m.retain} == {m.topic for m in configs} | {
            availability_topic(site, GW)
        }
        assert len(kept) == len(configs) + 1
        for m in configs:
            check_ha_config(m.topic, json.loads(m.payload), prefix=f"ha-{site}")
        event_cfg = next(json.loads(m.payload) for m in configs if "/event/" in m.topic)
        front = [json.loads(m.payload) for m in msgs if m.topic == event_cfg["state_topic"]]
        assert front and all(p["event_type"] in event_cfg["event_types"] for p in front)
        assert {p["event_type"] for p in front} == {"match", "stale"}
        assert set(event_cfg["event_types"]) == set(EVENT_TYPES)
        person = [m for m in msgs if m.topic == person_topic(site, GW, "obama")]
        assert len(person) == 2
        # New people get their entities on their first match (biden was not listed).
        assert any("biden_presence" in m.topic for m in configs)

        # Double Take-compatible topics.
        dt = {m.topic: json.loads(m.payload) for m in msgs if m.topic.startswith(f"dt-{site}/")}
        assert dt[f"dt-{site}/matches/obama"]["match"]["name"] == "obama"
        # The box of the face the gateway decided on, in the snapshot it fetched.
        dt_obama = dt[f"dt-{site}/matches/obama"]
        box = events[dt_obama["id"]].face_box
        assert box is not None and box[2] > 40 and box[3] > 40, box
        assert dt_obama["match"]["box"] == dict(
            zip(("left", "top", "width", "height"), box, strict=True)
        )
        assert dt[f"dt-{site}/matches/unknown"]["camera"] == "back"
        assert dt[f"dt-{site}/cameras/side"]["counts"]["match"] == 1

        # Home Assistant restarts: its birth message brings every config back.
        listener.publish(f"ha-{site}/status", b"online")
        again = [
            m
            for m in listener.drain(1.0)
            if m.topic.startswith(f"ha-{site}/") and m.topic.endswith("/config")
        ]
        assert {m.topic for m in again} >= {m.topic for m in configs}
    finally:
        listener.close()
        frigate.close()
    assert camera_topic(site, GW, "front") == event_cfg["state_topic"]


def test_min_face_area_and_consensus_per_camera(
    real: dict[str, Any], photos: dict[str, Path], gateway_for: Any
) -> None:
    site, broker = real["site"], real["broker"]
    frigate = FrigateStandin(broker_url=broker.url, topic_prefix=f"frigate-{site}").start()
    try:
        frigate.latest["door"] = photos["obama3"].read_bytes()
        frigate.latest["tiny"] = photos["obama3"].read_bytes()
        gw = gateway_for(
            sources=[FrigateSource(url=frigate.url, topic_prefix=f"frigate-{site}")],
            outputs=[JsonEventsOutput()],
            policies={
                "door": Policy(consensus=2, attempts=3, attempt_interval_s=0.0, max_age_s=30),
                "tiny": Policy(min_face_area=100_000, attempts=1, max_age_s=30),
            },
        )
        listener = Listener(broker.url, [f"cipherface/v1/{site}/json/{GW}/events/+"])
        door = frigate.person_event("door", photos["obama2"].read_bytes())
        tiny = frigate.person_event(
            "tiny", photos["obama2"].read_bytes(), face_box=(0, 0, 100, 100)
        )
        wait_counts(gw, 2)
        events = {
            e.event_id: e
            for e in (IntegratorEvent.from_json(m.payload) for m in listener.drain(0.3))
        }
        listener.close()
        # Two frames had to agree: the snapshot and the latest frame.
        assert (events[door].event_type, events[door].identity, events[door].frames) == (
            "match",
            "obama",
            2,
        )
        # A face of 10,000 px under a 100,000 px floor is not identified at all.
        assert (events[tiny].event_type, events[tiny].error) == ("error", "face_too_small")
    finally:
        frigate.close()


def test_min_face_area_on_the_detected_box_whatever_the_source(
    real: dict[str, Any], photos: dict[str, Path], gateway_for: Any
) -> None:
    """JPEG-over-MQTT frames come with no face box: the box the detector finds is checked
    against each camera's floor, and a decided face's box reaches the integrator event and
    Double Take's payload."""
    import cv2

    site, broker, edge = real["site"], real["broker"], real["edge"]
    portrait = cv2.imread(str(photos["obama2"]))
    # A quarter of the size: a face of about 75 x 75 px in a 156 x 300 px frame.
    small = cv2.resize(portrait, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    jpeg = cv2.imencode(".jpg", small)[1].tobytes()
    face = edge.embedder.represent_face(jpeg)
    assert 2_500 < face.area < 10_000, face.box
    listener = Listener(
        broker.url, [f"cipherface/v1/{site}/json/{GW}/events/+", f"dt-{site}/matches/+"]
    )
    try:
        gw = gateway_for(
            sources=[MqttJpegSource(topic=f"{site}-cams/+/person/snapshot", camera_level=1)],
            outputs=[JsonEventsOutput(), DoubleTakeOutput(topic_prefix=f"dt-{site}")],
            policies={  # 10,000 px: Double Take's own default floor for a match
                "far": Policy(min_face_area=10_000, attempts=1, max_age_s=30),
                "near": Policy(min_face_area=2_500, attempts=1, max_age_s=30),
            },
        )
        for camera in ("far", "near"):
            listener.publish(f"{site}-cams/{camera}/person/snapshot", jpeg)
        wait_counts(gw, 2)
        msgs = listener.drain(0.5)
    finally:
        listener.close()
    events = {
        e.camera: e
        for e in (IntegratorEvent.from_json(m.payload) for m in msgs if "/json/" in m.topic)
    }
    far, near = events["far"], events["near"]
    assert (far.event_type, far.error, far.face_box) == ("error", "face_too_small", None)
    assert far.message == f"face of {face.area} px < 10000"
    assert (near.event_type, near.identity, near.source) == ("match", "obama", "mqtt")
    assert near.face_box == face.box  # the detected face, in the frame's own pixels
    x, y, w, h = face.box
    assert x + w <= small.shape[1] and y + h <= small.shape[0]
    dt = [json.loads(m.payload) for m in msgs if m.topic == f"dt-{site}/matches/obama"]
    assert len(dt) == 1 and dt[0]["camera"] == "near"
    assert dt[0]["match"]["box"] == {"top": y, "left": x, "width": w, "height": h}
    assert not [m for m in msgs if m.topic == f"dt-{site}/matches/unknown"]


def _frames_of(source: OpenCVSource, gw: Gateway, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not gw.counts.get("match") and time.monotonic() < deadline:
        time.sleep(0.1)


def test_video_file_through_the_opencv_path(
    real: dict[str, Any], photos: dict[str, Path], gateway_for: Any, tmp_path: Path
) -> None:
    import cv2

    img = cv2.imread(str(photos["obama2"]))
    img = cv2.resize(img, (320, 608))
    video = tmp_path / "door.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 608))
    for _ in range(30):
        writer.write(img)
    writer.release()
    src = OpenCVSource(camera="porch", url=str(video), interval_s=0.3, loop=True)
    listener = Listener(real["broker"].url, [camera_topic(real["site"], GW, "porch")])
    gw = gateway_for(
        sources=[src], outputs=[JsonEventsOutput()], default_policy=Policy(attempts=1, max_age_s=10)
    )
    _frames_of(src, gw, 30)
    msg = listener.until(lambda m: json.loads(m.payload)["event_type"] == "match", 5)
    listener.close()
    ev = IntegratorEvent.from_json(msg.payload)
    assert (ev.identity, ev.source, ev.camera) == ("obama", "opencv", "porch")


def _rtsp_server(port: int, photo: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(HERE / "rtsp_standin.py"), str(port), str(photo), "320", "608"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def test_rtsp_camera_with_reconnect(
    real: dict[str, Any], photos: dict[str, Path], gateway_for: Any
) -> None:
    if (
        not Path("/usr/bin/python3").exists()
        or subprocess.run(
            [
                "/usr/bin/python3",
                "-c",
                "import gi; gi.require_version('GstRtspServer', '1.0'); "
                "from gi.repository import GstRtspServer",
            ],
            capture_output=True,
        ).returncode
        != 0
    ):
        pytest.skip(
            "GStreamer RTSP server not installed (apt-get install "
            "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-good "
            "python3-gi); the video-file test covers the OpenCV path"
        )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _rtsp_server(port, photos["obama2"])
    src = OpenCVSource(
        camera="gate", url=f"rtsp://127.0.0.1:{port}/cam", interval_s=0.5, reconnect_s=0.5
    )
    listener = Listener(real["broker"].url, [camera_topic(real["site"], GW, "gate")])
    try:
        gw = gateway_for(
            sources=[src],
            outputs=[JsonEventsOutput()],
            default_policy=Policy(attempts=1, max_age_s=10),
        )
        _frames_of(src, gw, 40)
        first = listener.until(lambda m: json.loads(m.payload)["event_type"] == "match", 5)
        assert IntegratorEvent.from_json(first.payload).identity == "obama"
        assert src.opened == 1
        server.terminate()
        server.wait(10)
        time.sleep(1.0)
        server = _rtsp_server(port, photos["obama2"])  # the camera comes back
        deadline = time.monotonic() + 60
        while src.opened < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert src.opened >= 2, "the source did not reconnect"
        listener.drain(0.1)
        again = listener.until(lambda m: json.loads(m.payload)["event_type"] == "match", 30)
        assert IntegratorEvent.from_json(again.payload).identity == "obama"
    finally:
        listener.close()
        server.terminate()
        server.wait(10)


def test_enroll_from_frigates_face_library(
    real: dict[str, Any], photos: dict[str, Path], tmp_path: Path
) -> None:
    import numpy as np

    from cipherface.cameras.enroll import embed_library, library

    faces = tmp_path / "media" / "clips" / "faces"
    for person, names in (
        ("barack", ["obama", "obama3"]),
        ("joe", ["biden"]),
        ("train", ["astronaut"]),
    ):  # train/: unsorted attempts, no person
        (faces / person).mkdir(parents=True)
        for n in names:
            (faces / person / photos[n].name).write_bytes(photos[n].read_bytes())
    (faces / "joe" / "broken.jpg").write_bytes(b"not a jpeg")
    people = library(tmp_path / "media")
    assert sorted(people) == ["barack", "joe"]
    ids, vectors, failures = embed_library(real["edge"], people, progress=False)
    assert ids == ["barack", "joe"] and vectors.shape == (2, 128)
    assert list(failures) == ["joe/broken.jpg"]
    probe = real["edge"].embed(photos["obama2"])
    sims = vectors @ probe
    assert 1 - sims[0] < 0.07 < 1 - sims[1]  # obama2 is barack, not joe
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_edge_command_with_a_config_file(
    real: dict[str, Any], photos: dict[str, Path], tmp_path: Path
) -> None:
    import os
    import sys

    site, broker = real["site"], real["broker"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("obama2", "astronaut"):
        (inbox / photos[name].name).write_bytes(photos[name].read_bytes())
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f"""
site = "{site}"
gateway = "cli1"
keys = "{real["keys"]}"
[defaults]
max_age_s = 120
attempts = 1
[homeassistant]
discovery_prefix = "ha-{site}-cli"
people = ["obama"]
[[sources]]
type = "folder"
path = "{inbox}"
camera = "lobby"
"""
    )
    env = {**os.environ, "CIPHERFACE_BROKER": broker.url}  # the cloud broker, from the env
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cipherface.agents.cli",
            "edge",
            "--config",
            str(cfg),
            "--max-photos",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = {r["event_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert (lines["obama2.jpg"]["event_type"], lines["obama2.jpg"]["identity"]) == (
        "match",
        "obama",
    )
    assert lines["astronaut.png"]["event_type"] == "unknown"
    assert lines["obama2.jpg"]["camera"] == "lobby" and lines["obama2.jpg"]["gateway"] == "cli1"
    late = Listener(broker.url, [f"ha-{site}-cli/#", availability_topic(site, "cli1")])
    kept = {m.topic: m.payload for m in late.drain(0.5)}
    late.close()
    assert kept[availability_topic(site, "cli1")] == b"offline"  # stopped cleanly
    assert f"ha-{site}-cli/event/cipherface_{site}_cli1/lobby_face/config" in kept
    assert any(t.endswith("/obama_presence/config") for t in kept)
    # Clean up the retained discovery configs this gateway left on the shared broker.
    pub = Listener(broker.url, ["unused/#"])
    for topic in kept:
        pub.publish(topic, b"", retain=True)
    pub.close()
