"""Conformance: a running cloud agent answers as docs/protocol.md says.

This client is written from the spec alone: raw paho-mqtt and msgpack, and
nothing from ``cipherface.protocol`` or ``cipherface.agents``. The one real
public key comes from the ``cipherface keygen`` command in a subprocess (the
spec leaves ciphertext internals to docs/crypto.md, which these tests do not
depend on). It runs on MQTT 5 and MQTT 3.1.1 (where the envelope is all a
client has to match a reply, section 2.1).

Run: ``python -m pytest -q tests/test_conformance.py``.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "cipherface/v1"
ENVELOPE_KEYS = {"v", "t", "id", "corr", "site", "gw", "kid", "ts", "exp", "b"}
ERROR_BODY = {"code", "message", "retry"}
RESULT_BODY = {
    "op",
    "ids_version",
    "scores",
    "count",
    "ids",
    "enrolled",
    "deleted",
    "offset",
    "total",
}
SPEC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def hex_id() -> str:
    return secrets.token_hex(16)


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope(t: str, site: str, gw: str, body: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A request envelope, every key present (spec section 5)."""
    ts = now_ms()
    env = {
        "v": 1,
        "t": t,
        "id": hex_id(),
        "corr": None,
        "site": site,
        "gw": gw,
        "kid": None,
        "ts": ts,
        "exp": ts + 30_000,
        "b": body,
    }
    env.update(over)
    return env


@dataclass
class Client:
    """One gateway's MQTT connection, subscribed to its res and err topics."""

    url: str
    site: str
    gw: str
    version: int
    replies: queue.Queue[tuple[str, dict[str, Any], Any]] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        host, port = self.url.removeprefix("mqtt://").rsplit(":", 1)
        proto = mqtt.MQTTv5 if self.version == 5 else mqtt.MQTTv311
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"conf-{hex_id()[:8]}", protocol=proto
        )
        subscribed = queue.Queue[bool]()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe(
            [(f"{PREFIX}/{self.site}/res/{self.gw}", 1), (f"{PREFIX}/{self.site}/err/{self.gw}", 1)]
        )
        subscribed.get(timeout=10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 2)[-2]
        env = msgpack.unpackb(msg.payload, raw=False)
        self.replies.put((kind, env, getattr(msg, "properties", None)))

    def send_raw(self, op: str, payload: bytes, *, topic: str | None = None) -> None:
        topic = topic or f"{PREFIX}/{self.site}/req/{self.gw}/{op}"
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def ask(self, op: str, env: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return self.ask_raw(op, msgpack.packb(env), env["id"])

    def ask_raw(self, op: str, payload: bytes, msg_id: str | None) -> tuple[str, dict[str, Any]]:
        """Publish and wait for the reply whose envelope ``corr`` is ``msg_id``."""
        self.send_raw(op, payload)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                kind, env, _ = self.replies.get(timeout=0.5)
            except queue.Empty:
                continue
            if env.get("corr") == msg_id:
                return kind, env
        raise AssertionError(f"no reply with corr={msg_id} on {op}")

    def silence(self, seconds: float = 1.5) -> list[Any]:
        out = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                out.append(self.replies.get(timeout=0.1))
            except queue.Empty:
                pass
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Cloud:
    url: str
    site: str
    agent_id: str
    kid: str
    public_key: bytes


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cipherface.agents.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def cloud(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    work = tmp_path_factory.mktemp("conformance")
    made = _cli("keygen", "--out", str(work / "keys"), "--json")
    assert made.returncode == 0, made.stderr
    kid = json.loads(made.stdout)["key_id"]
    site, agent = f"conf{hex_id()[:6]}", f"cloud-conf-{hex_id()[:6]}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cipherface.agents.cli",
            "cloud",
            "--broker",
            broker.url,
            "--data",
            str(work / "data"),
            "--agent-id",
            agent,
            "--sites",
            site,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving" in line, line
    try:
        yield Cloud(broker.url, site, agent, kid, (work / "keys" / "public.key").read_bytes())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(params=[5, 311], ids=["mqtt5", "mqtt311"])
def client(request: pytest.FixtureRequest, cloud: Cloud) -> Iterator[Client]:
    c = Client(cloud.url, cloud.site, f"gw{hex_id()[:6]}", request.param)
    yield c
    c.close()


def _check_error(kind: str, env: dict[str, Any], code: str, corr: str | None, c: Client) -> None:
    assert kind == "err", env
    assert set(env) == ENVELOPE_KEYS and set(env["b"]) == ERROR_BODY, env
    assert (env["t"], env["v"], env["corr"]) == ("error", 1, corr), env
    assert (env["site"], env["gw"]) == (c.site, c.gw), env
    assert env["b"]["code"] == code, env
    assert env["b"]["retry"] is False and isinstance(env["b"]["message"], str)
    assert "/" + "tmp" not in env["b"]["message"]  # never a server path


def _publish_key(c: Client, cloud: Cloud) -> dict[str, Any]:
    env = envelope(
        "key.publish",
        c.site,
        c.gw,
        {"scheme": "ckks", "public_key": cloud.public_key},
        kid=cloud.kid,
    )
    kind, reply = c.ask("key", env)
    assert kind == "res", reply
    return reply


# ----------------------------------------------------------------------- results
def test_key_publish_result(client: Client, cloud: Cloud) -> None:
    reply = _publish_key(client, cloud)
    assert set(reply) == ENVELOPE_KEYS and set(reply["b"]) == RESULT_BODY
    assert (reply["t"], reply["kid"], reply["b"]["op"]) == ("result", cloud.kid, "key.publish")
    assert reply["b"]["ids_version"] >= 0 and reply["b"]["scores"] is None


def test_ids_get_of_an_empty_gallery(client: Client, cloud: Cloud) -> None:
    _publish_key(client, cloud)
    env = envelope("ids.get", client.site, client.gw, {"offset": 0, "limit": None}, kid=cloud.kid)
    kind, reply = client.ask("ids", env)
    assert kind == "res", reply
    b = reply["b"]
    assert (b["op"], b["ids"], b["count"], b["offset"], b["total"]) == ("ids.get", [], 0, 0, 0)


def test_a_duplicate_gets_the_same_bytes(client: Client, cloud: Cloud) -> None:
    env = envelope("delete", client.site, client.gw, {"ids": ["nobody"]}, kid=None)
    first = client.ask("delete", env)
    second = client.ask("delete", env)
    assert first == second and first[0] == "res" and first[1]["b"]["deleted"] == 0


# ------------------------------------------------------------ errors, section 8.1
def test_key_that_does_not_load_is_key_file(client: Client, cloud: Cloud) -> None:
    env = envelope(
        "key.publish",
        client.site,
        client.gw,
        {"scheme": "ckks", "public_key": b"\x00garbage"},
        kid=hex_id(),
    )
    _check_error(*client.ask("key", env), "key_file", env["id"], client)


def test_unknown_scheme_is_invalid_field(client: Client, cloud: Cloud) -> None:
    env = envelope(
        "key.publish",
        client.site,
        client.gw,
        {"scheme": "rot13", "public_key": cloud.public_key},
        kid=cloud.kid,
    )
    _check_error(*client.ask("key", env), "invalid_field", env["id"], client)


def test_probe_that_does_not_fit_is_gallery_error(client: Client, cloud: Cloud) -> None:
    _publish_key(client, cloud)
    env = envelope(
        "verify",
        client.site,
        client.gw,
        {"identity": "alice", "probe": b"\x01\x02\x03"},
        kid=cloud.kid,
    )
    kind, reply = client.ask("verify", env)
    # Nobody is enrolled, so "unknown identity" may be found before the probe is read.
    assert reply["b"]["code"] in ("gallery_error", "unknown_identity"), reply
    _check_error(kind, reply, reply["b"]["code"], env["id"], client)


def test_payload_that_does_not_fit_is_gallery_error(client: Client, cloud: Cloud) -> None:
    # The gallery exists (key published): garbage ciphertexts do not fit it (spec 8.1).
    # (An identify probe is not read by an empty gallery: 6.5 answers count = 0.)
    _publish_key(client, cloud)
    env = envelope(
        "enroll", client.site, client.gw, {"ids": ["a"], "payload": b"\x01\x02\x03"}, kid=cloud.kid
    )
    _check_error(*client.ask("enroll", env), "gallery_error", env["id"], client)


def test_unknown_kid_is_key_mismatch(client: Client, cloud: Cloud) -> None:
    env = envelope(
        "identify", client.site, client.gw, {"probe": b"\x01", "ids_version": None}, kid=hex_id()
    )
    _check_error(*client.ask("identify", env), "key_mismatch", env["id"], client)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("duplicate-key", "malformed"),
        ("map-over-32", "malformed"),
        ("trailing-bytes", "malformed"),
        ("version-2", "unsupported_version"),
        ("unknown-type", "unknown_type"),
        ("missing-key", "malformed"),
        ("extra-key", "malformed"),
        ("bad-identity", "invalid_field"),
        ("topic-mismatch", "invalid_field"),
        ("expired", "expired"),
    ],
)
def test_parse_errors_carry_the_request_id(
    client: Client, cloud: Cloud, case: str, code: str
) -> None:
    env = envelope("delete", client.site, client.gw, {"ids": ["a"]})
    msg_id = env["id"]
    if case == "duplicate-key":
        # msgpack writers refuse duplicate keys: splice a second "b" entry by hand.
        base = msgpack.packb(env)
        payload = bytes([base[0] + 1]) + base[1:] + msgpack.packb("b") + msgpack.packb({})
    elif case == "map-over-32":
        payload = msgpack.packb({**env, **{f"x{i}": i for i in range(30)}})
    elif case == "trailing-bytes":
        payload = msgpack.packb(env) + b"\x00"
    else:
        if case == "version-2":
            env["v"] = 2
        elif case == "unknown-type":
            env["t"] = "frobnicate"
        elif case == "missing-key":
            del env["ts"]
        elif case == "extra-key":
            env["extra"] = 1
        elif case == "bad-identity":
            env["b"] = {"ids": ["a", "a"]}
        elif case == "topic-mismatch":
            env["gw"] = "someone-else"
        elif case == "expired":
            env["exp"] = env["ts"] = now_ms() - 1000
        payload = msgpack.packb(env)
    kind, reply = client.ask_raw("delete", payload, msg_id)
    assert kind == "err" and reply["b"]["code"] == code, reply
    assert reply["b"]["retry"] is (code == "expired"), reply
    assert (reply["site"], reply["gw"], reply["corr"]) == (client.site, client.gw, msg_id)


def test_unreadable_id_gives_nil_corr(client: Client, cloud: Cloud) -> None:
    client.send_raw("delete", b"\xc1 not msgpack")
    got = [r for r in client.silence(3.0) if r[1].get("corr") is None]
    assert got and got[0][0] == "err" and got[0][1]["b"]["code"] == "malformed", got


def test_invalid_topics_get_no_answer(client: Client, cloud: Cloud) -> None:
    env = envelope("delete", client.site, client.gw, {"ids": ["a"]})
    for topic in (
        f"{PREFIX}/{client.site}/req/{client.gw}/hack",
        f"{PREFIX}/{client.site}/req/{client.gw.upper()}/delete",
    ):
        client.send_raw("delete", msgpack.packb(env), topic=topic)
    assert [r for r in client.silence(2.0) if r[1].get("corr") == env["id"]] == []


# ----------------------------------------------------------- status, spec vector
def test_cloud_status_is_retained_and_online(cloud: Cloud) -> None:
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"conf-st-{hex_id()[:6]}")
    c.on_message = lambda _c, _u, m: got.put(m)
    host, port = cloud.url.removeprefix("mqtt://").rsplit(":", 1)
    c.connect(host, int(port))
    c.loop_start()
    try:
        c.subscribe(f"{PREFIX}/cloud/status/{cloud.agent_id}", 1)
        msg = got.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()
    assert msg.retain
    env = msgpack.unpackb(msg.payload, raw=False)
    assert (env["t"], env["site"], env["gw"]) == ("status", "cloud", cloud.agent_id)
    assert env["b"]["state"] == "online" and env["b"]["role"] == "cloud" and env["b"]["version"]


def test_spec_test_vector_decodes_as_described() -> None:
    text = SPEC.read_text(encoding="utf-8")
    block = text.split("## 15 Test vectors", 1)[1].split("```", 2)[1]
    data = bytes.fromhex("".join(block.split()))
    env = msgpack.unpackb(data, raw=False)
    assert len(data) == 171 and set(env) == ENVELOPE_KEYS
    assert env["b"] == {"identity": "alice", "probe": b"\x01\x02\x03"}
    assert (env["site"], env["gw"], env["ts"], env["exp"]) == (
        "plant-7",
        "door_1",
        1700000000000,
        1700000030000,
    )
