"""Deployment: broker config, credentials, ACL -- attacked on a real Mosquitto.

The live tests run the project's own mosquitto.conf (``secure_broker``) with
accounts made by ``cipherface creds`` (``secure_deployment``, see conftest.py).
Mosquitto 2.0 answers every SUBSCRIBE with "granted" and filters on delivery, so
a denied read is proven by a message that never arrives while a legitimate
subscriber (the positive control) does get it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cipherface.agents import broker as broker_mod
from cipherface.agents.broker import (
    PROJECT_CONFIG,
    BrokerFiles,
    BrokerUnavailableError,
    LocalBroker,
    config_value,
    find_broker,
    parse_broker_url,
    render_config,
)
from cipherface.agents.deploy import (
    ENV_VARS,
    Account,
    Deployment,
    cloud_username,
    create_ca,
    gateway_username,
    hash_password,
    integrator_username,
    issue_client_cert,
    issue_server_cert,
    main,
    parse_password_file,
    register_cli,
    render_acl,
    verify_password,
)
from cipherface.errors import InvalidArgumentError, LocalError
from cipherface.observe.health import cloud_health_topic, edge_health_topic
from cipherface.protocol import MAX_MESSAGE_BYTES
from cipherface.protocol.topics import (
    cloud_request_filter,
    cloud_status_topic,
    error_topic,
    events_topic,
    request_topic,
    result_topic,
    status_topic,
)

REPO = Path(__file__).resolve().parents[1]
NEVER = 1.0  # seconds we wait for a message that must not arrive
NOT_AUTHORIZED = 0x87
SECRET_MODE = 0o600


# ------------------------------------------------------------------ MQTT probe
@dataclass
class Probe:
    """A paho-mqtt 2.x (MQTT 5) client that records what the broker answers."""

    port: int
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    tls: bool = False
    client_id: str = ""
    clean_start: bool = True
    session_expiry: int = 0
    will: tuple[str, bytes] | None = None
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    connack: Any = None
    disconnected: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._connected = threading.Event()
        self.connack_session_present = False
        self._acks: dict[int, Any] = {}
        self._ack_cv = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if self.username is not None:
            self.client.username_pw_set(self.username, self.password)
        if self.tls:
            self.client.tls_set(ca_certs=None if self.ca is None else str(self.ca))
        if self.will is not None:
            self.client.will_set(self.will[0], self.will[1], qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    # callbacks run on paho's network thread
    def _on_connect(self, client: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        self.connack_session_present = bool(flags.session_present)
        if rc.is_failure:
            client.disconnect()  # refused: no reconnect loop
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: Any, _p: Any) -> None:
        with self._ack_cv:
            self._acks[mid] = [rc.value for rc in rcs]
            self._ack_cv.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._ack_cv:
            self._acks[mid] = rc.value
            self._ack_cv.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self.disconnected.set()

    def connect(self, timeout: float = 3.0) -> int:
        """Connect; return the CONNACK reason code (0 = accepted)."""
        props = None
        if self.session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        self.client.connect(
            "127.0.0.1", self.port, keepalive=30, clean_start=self.clean_start, properties=props
        )
        self.client.loop_start()
        assert self._connected.wait(timeout), "no CONNACK"
        if self.connack.value != 0:
            self.close()  # no reconnect loop on a refusal
        return int(self.connack.value)

    def _wait_ack(self, mid: int, timeout: float = 3.0) -> Any:
        with self._ack_cv:
            assert self._ack_cv.wait_for(lambda: mid in self._acks, timeout), "no ack"
            return self._acks.pop(mid)

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        """Subscribe and return the SUBACK reason codes."""
        rc, mid = self.client.subscribe(topic, qos=qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        return list(self._wait_ack(mid))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return int(self._wait_ack(info.mid, timeout=30))

    def received(self, within: float = NEVER) -> list[tuple[str, bytes]]:
        """Everything that arrived, waiting ``within`` seconds first."""
        time.sleep(within)
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def wait_for(self, topic: str, timeout: float = 5.0) -> bytes:
        """Wait for one message on ``topic`` and return its payload."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got_topic, payload = self.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if got_topic == topic:
                return payload
        raise AssertionError(f"nothing on {topic} within {timeout} s")

    def close(self) -> None:
        try:
            self.client.disconnect()
        except (OSError, ValueError):
            pass  # the test already cut the socket
        self.client.loop_stop()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    """Probes registered here are closed after the test."""
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def login(
    probes: list[Probe], broker: LocalBroker, dep: Deployment, username: str, **kw: Any
) -> Probe:
    """Connect ``username`` over TLS with the dev CA; assert the broker accepts it."""
    assert broker.tls_port is not None
    kw.setdefault("tls", True)
    kw.setdefault("ca", dep.ca_cert_path)
    p = Probe(
        port=broker.tls_port if kw["tls"] else broker.port,
        username=username,
        password=dep.password(username),
        **kw,
    )
    probes.append(p)
    assert p.connect() == 0, f"{username} refused: {p.connack}"
    return p


# ================================================================ static checks
def project_config() -> str:
    return PROJECT_CONFIG.read_text(encoding="utf-8")


def listener_blocks(text: str) -> dict[str, list[str]]:
    """``listener`` line -> the option lines under it."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("listener "):
            current = blocks.setdefault(line, [])
        elif current is not None:
            current.append(line)
    return blocks


def global_options(text: str) -> list[str]:
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("listener "):
            break
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_project_config_is_locked_down() -> None:
    text = project_config()
    head = global_options(text)
    assert "allow_anonymous false" in head
    assert "allow_anonymous true" not in text
    assert config_value(text, "password_file") == "/mosquitto/secrets/passwd"
    assert config_value(text, "acl_file") == "/mosquitto/secrets/acl"
    assert config_value(text, "persistence") == "true"
    assert config_value(text, "persistence_location") == "/mosquitto/data/"
    assert config_value(text, "set_tcp_nodelay") == "true"
    blocks = listener_blocks(text)
    assert set(blocks) == {"listener 8883", "listener 1883 127.0.0.1"}
    tls = blocks["listener 8883"]
    for opt in ("cafile", "certfile", "keyfile"):
        assert any(line.startswith(f"{opt} /mosquitto/secrets/") for line in tls), opt
    assert not any(
        line.startswith(("cafile", "certfile")) for line in blocks["listener 1883 127.0.0.1"]
    )
    # Listener option: above the first listener it would open 0.0.0.0:1883 (seen on 2.0.11).
    for lines in blocks.values():
        assert "use_username_as_clientid true" in lines
    assert not any(opt.startswith("use_username_as_clientid") for opt in head)


def test_project_config_limits_fit_the_protocol() -> None:
    text = project_config()
    size_limit = int(config_value(text, "message_size_limit") or 0)
    assert size_limit >= MAX_MESSAGE_BYTES >= 64 * 1024 * 1024
    assert int(config_value(text, "max_packet_size") or 0) > size_limit
    # Queues must hold several maximal messages, but not unbounded.
    assert 4 * size_limit <= int(config_value(text, "max_inflight_bytes") or 0) <= 2**31
    assert 16 * size_limit <= int(config_value(text, "max_queued_bytes") or 0) <= 2**32
    assert 1 <= int(config_value(text, "max_inflight_messages") or 0) <= 20
    assert 100 <= int(config_value(text, "max_queued_messages") or 0) <= 100_000


def test_render_rewrites_paths_and_ports(tmp_path: Path) -> None:
    files = BrokerFiles(
        password_file=tmp_path / "pw",
        acl_file=tmp_path / "acl",
        cafile=tmp_path / "ca.crt",
        certfile=tmp_path / "s.crt",
        keyfile=tmp_path / "s.key",
    )
    out = render_config(
        project_config(),
        profile="secure",
        workdir=tmp_path,
        port=1234,
        tls_port=2345,
        files=files,
    )
    assert "/mosquitto/" not in out
    blocks = listener_blocks(out)
    assert set(blocks) == {"listener 2345 127.0.0.1", "listener 1234 127.0.0.1"}
    assert f"certfile {tmp_path / 's.crt'}" in blocks["listener 2345 127.0.0.1"]
    assert f"password_file {tmp_path / 'pw'}" in out
    assert "allow_anonymous false" in out and "allow_anonymous true" not in out
    assert config_value(out, "message_size_limit") == config_value(
        project_config(), "message_size_limit"
    )


def test_dev_profile_drops_auth_keeps_limits(tmp_path: Path) -> None:
    out = render_config(
        project_config(),
        profile="dev",
        workdir=tmp_path,
        port=1234,
        tls_port=None,
        files=BrokerFiles(),
    )
    assert "allow_anonymous true" in out
    for gone in ("password_file", "acl_file", "use_username_as_clientid", "cafile"):
        assert gone not in out
    assert list(listener_blocks(out)) == ["listener 1234 127.0.0.1"]
    for kept in ("message_size_limit", "max_queued_bytes", "set_tcp_nodelay", "persistence"):
        assert config_value(out, kept) == config_value(project_config(), kept)


def test_render_refuses_what_it_cannot_map(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"workdir": tmp_path, "port": 1, "tls_port": None, "files": BrokerFiles()}
    with pytest.raises(InvalidArgumentError, match="include_dir"):
        render_config("include_dir /mosquitto/conf.d\n", profile="dev", **kw)
    with pytest.raises(InvalidArgumentError, match="password_file"):
        render_config(project_config(), profile="secure", **kw)
    with pytest.raises(InvalidArgumentError, match="TLS"):
        render_config(project_config(), profile="dev", **{**kw, "tls_port": 2})


def test_broker_url_parsing() -> None:
    assert parse_broker_url("mqtt://127.0.0.1") == ("mqtt", "127.0.0.1", 1883)
    assert parse_broker_url("mqtts://mosquitto") == ("mqtts", "mosquitto", 8883)
    assert parse_broker_url("mqtts://h:9") == ("mqtts", "h", 9)
    for bad in ("http://h", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(InvalidArgumentError):
            parse_broker_url(bad)


def test_find_broker_order(monkeypatch: pytest.MonkeyPatch) -> None:
    src = find_broker(env={"MQTT_URL": "mqtt://10.0.0.1:1884"})
    assert (src.kind, src.url) == ("url", "mqtt://10.0.0.1:1884")
    with pytest.raises(InvalidArgumentError):
        find_broker(env={"MQTT_URL": "tcp://x"})
    monkeypatch.setattr(broker_mod, "mosquitto_binary", lambda: "/opt/mosquitto")
    assert find_broker(env={}).binary == "/opt/mosquitto"
    monkeypatch.setattr(broker_mod, "mosquitto_binary", lambda: None)
    with pytest.raises(BrokerUnavailableError, match=r"apt-get install -y mosquitto.*MQTT_URL"):
        find_broker(env={}, use_docker=False)
    assert issubclass(BrokerUnavailableError, LocalError)


# ------------------------------------------------------------- names and hashes
def test_username_scheme_is_unambiguous() -> None:
    assert gateway_username("site-a", "gw1") == "site-a.gw1"
    assert cloud_username("main") == "cloud-main"
    assert integrator_username("site-a") == "site-a@integrator"
    for bad in ("", "A", "a/b", "a+b", "a#", "$sys", "a.b", "a@b", "x" * 64, "a\n"):
        with pytest.raises(InvalidArgumentError):
            gateway_username(bad, "gw")
        with pytest.raises(InvalidArgumentError):
            gateway_username("site", bad)
    with pytest.raises(InvalidArgumentError, match="reserved"):
        gateway_username("cloud", "gw1")  # would write cipherface/v1/cloud/status/...
    with pytest.raises(InvalidArgumentError):
        cloud_username("cloud-main")


def test_acl_rules_follow_the_topic_tree() -> None:
    gw = Account.for_gateway("site-a", "gw1")
    rules = {(r.access, r.topic) for r in gw.acl_rules()}
    assert ("write", "cipherface/v1/site-a/req/gw1/#") in rules
    assert ("read", result_topic("site-a", "gw1")) in rules
    assert ("read", error_topic("site-a", "gw1")) in rules
    assert ("write", events_topic("site-a", "gw1")) in rules
    assert ("readwrite", status_topic("site-a", "gw1")) in rules
    cloud = Account.for_cloud("main", ["site-b", "site-a"])
    topics = [r.topic for r in cloud.acl_rules()]
    assert cloud.sites == ("site-a", "site-b")
    assert not any("/events/" in t for t in topics)
    assert ("readwrite", cloud_status_topic("cloud-main")) in {
        (r.access, r.topic) for r in cloud.acl_rules()
    }
    text = render_acl([gw, cloud, Account.for_health()])
    first = next(line for line in text.splitlines() if line and not line.startswith("#"))
    assert first.startswith("user ")  # nothing for anonymous clients
    assert "pattern" not in text and "topic readwrite #" not in text
    assert "\ntopic read #" not in text and "+/#" not in text


def test_password_hash_format() -> None:
    encoded = hash_password("s3cret", iterations=101, salt=b"\x01" * 12)
    _, seven, rounds, salt, digest = encoded.split("$")
    assert (seven, rounds, len(salt), len(digest)) == ("7", "101", 16, 88)
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert hash_password("s3cret") != hash_password("s3cret")  # fresh salt each time
    with pytest.raises(InvalidArgumentError):
        verify_password("x", "$6$abc$def")
    with pytest.raises(InvalidArgumentError):
        hash_password("")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pw_file), "alice", "correct horse"], check=True
    )
    theirs = parse_password_file(pw_file.read_text())["alice"]
    assert theirs.startswith("$7$")
    assert verify_password("correct horse", theirs)
    assert not verify_password("correct horse ", theirs)


# --------------------------------------------------------------- certificates
def test_certificates() -> None:
    ca = create_ca()
    ca_cert = ca.certificate
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = issue_server_cert(ca, hostnames=["mosquitto", "10.1.2.3", "broker.example.org"])
    cert = server.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "mosquitto", "broker.example.org"} <= dns
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    cert.verify_directly_issued_by(ca_cert)
    with pytest.raises(Exception):  # noqa: B017 -- any verification failure will do
        cert.verify_directly_issued_by(create_ca().certificate)
    client = issue_client_cert(ca, username="site-a.gw1").certificate
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-a.gw1"
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert isinstance(server.private_key(), ec.EllipticCurvePrivateKey)
    with pytest.raises(InvalidArgumentError):
        issue_server_cert(ca, hostnames=["bad host!"])


def test_secret_files_are_0600(secure_deployment: Deployment) -> None:
    dep = secure_deployment
    secrets_ = [dep.ca_key_path, dep.health_password_path, *asdict(dep.broker_files).values()]
    for acct in dep.accounts:
        if acct.role != "health":
            f = dep.account_files(acct.username)
            secrets_ += [f.password, f.key, f.env]
            assert stat.S_IMODE(f.cert.stat().st_mode) == 0o644
    public = {dep.broker_files.cafile, dep.broker_files.certfile}
    for path in secrets_:
        if path in public:
            continue
        assert stat.S_IMODE(path.stat().st_mode) == SECRET_MODE, path
    assert stat.S_IMODE(dep.ca_cert_path.stat().st_mode) == 0o644
    passwd = dep.broker_files.password_file
    assert passwd is not None
    hashes = parse_password_file(passwd.read_text())
    assert set(hashes) == {a.username for a in dep.accounts}
    assert all(
        dep.password(u) not in passwd.read_text() for u in hashes if u != "cipherface-health"
    )


def test_creds_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "creds")

    def run(*argv: str) -> dict[str, Any]:
        assert main(["creds", *argv, "--dir", d, "--json"]) == 0
        return dict(json.loads(capsys.readouterr().out))

    out = run("init", "--hostname", "mosquitto")
    assert "mosquitto" in out["hostnames"]
    out = run("add-site", "shop1", "--gateway", "door", "--gateway", "till", "--integrator")
    names = [a["username"] for a in out["created"]]
    assert names == ["shop1.door", "shop1.till", "shop1@integrator"]
    env = Path(out["created"][0]["files"]["env"]).read_text()
    assert "CIPHERFACE_SITE=shop1\n" in env and "CIPHERFACE_GATEWAY=door\n" in env
    assert set(line.split("=")[0] for line in env.splitlines()) <= set(ENV_VARS)
    assert run("add-site", "shop1", "--gateway", "door")["created"] == []  # idempotent
    out = run("add-cloud", "w1", "--sites", "shop1,shop2")
    assert out["account"]["sites"] == ["shop1", "shop2"] and out["warnings"] == []
    assert "cloud-w1" in run("add-cloud", "w2", "--sites", "shop1")["warnings"][0]  # share group
    assert run("add-cloud", "w2", "--sites", "shop2")["warnings"] == []  # now the same sites
    run("remove", "cloud-w2")
    old = Deployment.open(d).password("shop1.door")
    run("rotate", "shop1.door")
    assert Deployment.open(d).password("shop1.door") != old
    run("remove", "shop1.till")
    listed = {a["username"] for a in run("list")["accounts"]}
    assert listed == {"cipherface-health", "shop1.door", "shop1@integrator", "cloud-w1"}
    assert not (tmp_path / "creds" / "accounts" / "shop1.till").exists()
    assert "shop1.till" not in (tmp_path / "creds" / "broker" / "acl").read_text()
    # errors are LocalErrors with their code, exit status 2
    assert main(["creds", "add-site", "cloud", "--gateway", "x", "--dir", d]) == 2
    assert "reserved" in capsys.readouterr().err
    assert main(["creds", "init", "--dir", d]) == 2  # no silent CA replacement


def test_register_cli_plugs_into_a_parser() -> None:
    parser = argparse.ArgumentParser(prog="cipherface")
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    args = parser.parse_args(["creds", "add-cloud", "w", "--sites", "a", "--sites", "b,c"])
    assert args.command == "creds" and args.name == "w" and callable(args.func)


# --------------------------------------------------------------- docker compose
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def test_compose_services_are_wired() -> None:
    doc = compose()
    services = doc["services"]
    assert {"mosquitto", "cloud", "edge"} <= set(services)
    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert svc["healthcheck"]["test"], name
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    for agent in ("cloud", "edge"):
        svc = services[agent]
        env = svc["environment"]
        names = set(env) if isinstance(env, dict) else {e.split("=")[0] for e in env}
        assert names <= set(ENV_VARS), names - set(ENV_VARS)
        assert {"CIPHERFACE_BROKER", "CIPHERFACE_CA", "CIPHERFACE_DATA"} <= names
        assert svc["depends_on"]["mosquitto"]["condition"] == "service_healthy"
        broker_url = env["CIPHERFACE_BROKER"]
        assert parse_broker_url(broker_url)[0] == "mqtts"  # agents use TLS, never plain
    assert services["cloud"]["command"][:2] == ["cipherface", "cloud"]
    assert services["edge"]["command"][:2] == ["cipherface", "edge"]
    assert "--watch" in services["edge"]["command"]
    volumes = set(doc["volumes"])
    assert {"cloud-gallery"} <= volumes
    cloud_mounts = [v for v in services["cloud"]["volumes"] if isinstance(v, str)]
    assert any(v.startswith("cloud-gallery:/data") for v in cloud_mounts)


def test_compose_mounts_every_broker_path() -> None:
    svc = compose()["services"]["mosquitto"]
    targets: dict[str, str] = {}
    for vol in svc["volumes"]:
        source, target = vol.split(":")[:2]
        targets[target.rstrip("/")] = source
    paths = [
        word
        for line in project_config().splitlines()
        if not line.strip().startswith("#")
        for word in line.split()
        if word.startswith("/mosquitto/")
    ]
    assert paths
    for path in paths:
        assert any(path.rstrip("/") == t or path.startswith(t + "/") for t in targets), (
            f"{path} is not mounted"
        )
    assert targets["/mosquitto/config/mosquitto.conf"] == "./mosquitto.conf"
    assert (REPO / "mosquitto.conf").is_file()
    # 8883 published; the plain listener stays inside the container.
    assert any(str(p).endswith("8883") for p in svc["ports"])
    assert not any("1883" in str(p) for p in svc["ports"])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile


# ============================================================== live: secure broker
def test_broker_listens_only_where_configured(secure_broker: LocalBroker) -> None:
    log = secure_broker.log_path.read_text()
    opened = {
        int(line.rsplit(" ", 1)[1].rstrip("."))
        for line in log.splitlines()
        if "listen socket on port" in line
    }
    assert opened == {secure_broker.port, secure_broker.tls_port}


def test_anonymous_and_bad_passwords_refused(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    dep = secure_deployment
    good = dep.password("site-a.gw1")
    attempts = {
        "anonymous (plain loopback)": Probe(port=secure_broker.port),
        "anonymous (TLS)": Probe(port=secure_broker.tls_port or 0, tls=True, ca=dep.ca_cert_path),
        "wrong password": Probe(
            port=secure_broker.port, username="site-a.gw1", password=good + "x"
        ),
        "empty password": Probe(port=secure_broker.port, username="site-a.gw1", password=""),
        "unknown user": Probe(port=secure_broker.port, username="site-c.gw1", password=good),
        "other user's password": Probe(
            port=secure_broker.port, username="cloud-main", password=good
        ),
    }
    probes.extend(attempts.values())
    for what, probe in attempts.items():
        assert probe.connect() in (0x86, 0x87), what  # bad user name or password / not authorized
    ok = Probe(port=secure_broker.port, username="site-a.gw1", password=good)
    probes.append(ok)
    assert ok.connect() == 0  # control: the loopback listener does take real accounts


def test_tls_needs_the_dev_ca(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    dep = secure_deployment
    assert login(probes, secure_broker, dep, "site-a.gw2").connack.value == 0
    wrong_ca = dep.directory.parent / "other-ca.crt"
    wrong_ca.write_bytes(create_ca(common_name="Mallory CA").cert_pem)
    for ca in (None, wrong_ca):  # system trust store, then another CA
        p = Probe(
            port=secure_broker.tls_port or 0,
            username="site-a.gw2",
            password=dep.password("site-a.gw2"),
            tls=True,
            ca=ca,
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            p.client.connect("127.0.0.1", p.port)
    # Plain MQTT on the TLS port gets nowhere either.
    plain = Probe(port=secure_broker.tls_port or 0, username="site-a.gw2", password="x")
    try:
        plain.client.connect("127.0.0.1", plain.port)
        plain.client.loop_start()
        assert not plain._connected.wait(NEVER)
    except OSError:
        pass
    finally:
        plain.close()


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="no mosquitto_sub")
def test_compose_healthcheck_command(
    secure_broker: LocalBroker, secure_deployment: Deployment
) -> None:
    test = compose()["services"]["mosquitto"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = (
        test[1]
        .replace("$$", "$")
        .replace("/mosquitto/secrets/", f"{secure_deployment.broker_dir}/")
        .replace("-p 1883", f"-p {secure_broker.port}")
    )
    assert subprocess.run(command, shell=True, timeout=10, capture_output=True).returncode == 0
    broken = command.replace("health.password", "ca.crt")  # wrong password -> unhealthy
    assert subprocess.run(broken, shell=True, timeout=10, capture_output=True).returncode != 0


# ------------------------------------------------------------ the traffic matrix
@dataclass(frozen=True)
class Matrix:
    """What each subscriber received and what each publish got back."""

    got: dict[str, set[str]]  # subscriber -> topics received
    subacks: dict[tuple[str, str], list[int]]
    pubacks: dict[tuple[str, str], int]


SUBSCRIPTIONS: dict[str, list[str]] = {
    "site-a.gw1": [
        "#",
        "$SYS/#",
        "cipherface/#",
        result_topic("site-b", "gw1"),
        "cipherface/v1/site-b/#",
        result_topic("site-a", "gw2"),
        "cipherface/v1/+/req/+/+",
        "cipherface/v1/+/events/+",
        *(result_topic("site-a", "gw1"), error_topic("site-a", "gw1")),
    ],
    "site-a.gw2": [result_topic("site-a", "gw2"), error_topic("site-a", "gw2")],
    "site-b.gw1": ["#", result_topic("site-b", "gw1"), error_topic("site-b", "gw1")],
    "cloud-main": [cloud_request_filter(), "cipherface/v1/+/events/+", "#", "$share/x/#"],
    "cloud-b": ["cipherface/v1/+/req/+/+", "cipherface/v1/+/res/+"],
    "site-a@integrator": ["cipherface/v1/+/events/+", "cipherface/v1/+/status/+", "#"],
    "site-b@integrator": ["cipherface/v1/site-b/events/+"],
}

# (publisher, topic); every topic is unique so the receivers can be told apart.
PUBLISHES: list[tuple[str, str]] = [
    ("site-a.gw1", request_topic("site-a", "gw1", "verify")),  # legit
    ("site-b.gw1", request_topic("site-b", "gw1", "identify")),  # legit
    ("site-a.gw1", request_topic("site-b", "gw1", "enroll")),  # into site B's requests
    ("site-a.gw1", request_topic("site-a", "gw2", "delete")),  # as its neighbour
    ("site-a.gw1", result_topic("site-a", "gw2")),  # a fake cloud result
    ("site-a.gw1", error_topic("site-a", "gw2")),  # a fake cloud error
    ("site-a.gw1", events_topic("site-a", "gw1")),  # legit decision
    ("site-a.gw1", events_topic("site-b", "gw1")),  # a fake decision at site B
    ("site-a.gw1", status_topic("site-a", "gw1")),  # legit
    ("site-a.gw1", cloud_status_topic("cloud-main")),  # impersonate the cloud
    ("cloud-main", result_topic("site-b", "gw1")),  # legit
    ("cloud-main", error_topic("site-a", "gw1")),  # legit
    ("cloud-main", cloud_status_topic("cloud-main")),  # legit
    ("cloud-main", cloud_health_topic("cloud-main")),  # legit: JSON health
    ("site-a.gw1", edge_health_topic("site-a", "gw1")),  # legit: JSON health
    ("site-a.gw1", edge_health_topic("site-a", "gw2")),  # its neighbour's health
    ("cloud-b", result_topic("site-a", "gw1")),  # a site it does not serve
    ("cloud-b", events_topic("site-b", "gw1")),  # the cloud writing decisions
    ("site-a@integrator", request_topic("site-a", "gw1", "ids")),  # integrators only read
]

ALLOWED_PUBLISHES = {
    ("site-a.gw1", request_topic("site-a", "gw1", "verify")),
    ("site-b.gw1", request_topic("site-b", "gw1", "identify")),
    ("site-a.gw1", events_topic("site-a", "gw1")),
    ("site-a.gw1", status_topic("site-a", "gw1")),
    ("cloud-main", result_topic("site-b", "gw1")),
    ("cloud-main", error_topic("site-a", "gw1")),
    ("cloud-main", cloud_status_topic("cloud-main")),
    ("cloud-main", cloud_health_topic("cloud-main")),
    ("site-a.gw1", edge_health_topic("site-a", "gw1")),
}

# The complete truth: who may see which of the allowed messages.
EXPECTED: dict[str, set[str]] = {
    "site-a.gw1": {
        error_topic("site-a", "gw1"),
        status_topic("site-a", "gw1"),
        edge_health_topic("site-a", "gw1"),
        cloud_status_topic("cloud-main"),
    },
    "site-a.gw2": set(),
    "site-b.gw1": {result_topic("site-b", "gw1"), cloud_status_topic("cloud-main")},
    "cloud-main": {
        request_topic("site-a", "gw1", "verify"),
        request_topic("site-b", "gw1", "identify"),
        cloud_status_topic("cloud-main"),
        cloud_health_topic("cloud-main"),
    },
    "cloud-b": {request_topic("site-b", "gw1", "identify")},
    # Integrators read their site's decisions, statuses and health, and the cloud's
    # status and health (JSON, no site data): docs/operations.md.
    "site-a@integrator": {
        events_topic("site-a", "gw1"),
        status_topic("site-a", "gw1"),
        edge_health_topic("site-a", "gw1"),
        cloud_status_topic("cloud-main"),
        cloud_health_topic("cloud-main"),
    },
    "site-b@integrator": set(),
}


@pytest.fixture(scope="module")
def matrix(secure_broker: LocalBroker, secure_deployment: Deployment) -> Matrix:
    """Subscribe every account to everything it tries, publish every attempt, wait once.

    The clients are closed before the tests look at the result: the broker allows
    one connection per account, and later tests log the same accounts in.
    """
    made: list[Probe] = []
    try:
        clients = {u: login(made, secure_broker, secure_deployment, u) for u in SUBSCRIPTIONS}
        subacks = {
            (u, f): clients[u].subscribe(f) for u, filters in SUBSCRIPTIONS.items() for f in filters
        }
        pubacks = {(u, t): clients[u].publish(t, f"{u} -> {t}".encode()) for u, t in PUBLISHES}
        time.sleep(NEVER)
        got = {u: {t for t, _ in c.received(within=0)} for u, c in clients.items()}
    finally:
        for p in made:
            p.close()
    return Matrix(got=got, subacks=subacks, pubacks=pubacks)


def test_matrix_exact_deliveries(matrix: Matrix) -> None:
    assert matrix.got == EXPECTED


def test_publish_acks_tell_the_denials(matrix: Matrix) -> None:
    for key, rc in matrix.pubacks.items():
        if key in ALLOWED_PUBLISHES:
            assert rc < 0x80, key
        else:
            assert rc == NOT_AUTHORIZED, key


def test_mosquitto_grants_subscriptions_then_filters(matrix: Matrix) -> None:
    # Documented Mosquitto 2.0 behaviour the ACL tests rely on: SUBACK says granted
    # (QoS 1) even for '#'; delivery is what the ACL filters (see test_matrix_exact...).
    assert matrix.subacks[("site-a.gw1", "#")] == [1]
    assert matrix.subacks[("cloud-main", cloud_request_filter())] == [1]


def test_gateway_cannot_read_other_sites_results(matrix: Matrix) -> None:
    assert result_topic("site-b", "gw1") in matrix.got["site-b.gw1"]  # control
    assert not any("/site-b/" in t for t in matrix.got["site-a.gw1"])
    assert result_topic("site-a", "gw2") not in matrix.got["site-a.gw1"]


def test_gateway_cannot_inject_requests_or_results(matrix: Matrix) -> None:
    cloud = matrix.got["cloud-main"]
    assert request_topic("site-a", "gw1", "verify") in cloud  # control
    assert request_topic("site-b", "gw1", "enroll") not in cloud | matrix.got["cloud-b"]
    assert request_topic("site-a", "gw2", "delete") not in cloud
    assert matrix.got["site-a.gw2"] == set()  # no fake result / error from a neighbour
    assert matrix.pubacks[("site-a.gw1", result_topic("site-a", "gw2"))] == NOT_AUTHORIZED


def test_cloud_cannot_read_events(matrix: Matrix) -> None:
    assert events_topic("site-a", "gw1") in matrix.got["site-a@integrator"]  # control
    assert not any("/events/" in t for t in matrix.got["cloud-main"] | matrix.got["cloud-b"])


def test_cloud_reads_only_the_sites_it_serves(matrix: Matrix) -> None:
    assert matrix.got["cloud-b"] == {request_topic("site-b", "gw1", "identify")}


def test_nobody_reads_everything(matrix: Matrix) -> None:
    everything = {t for _, t in ALLOWED_PUBLISHES}
    for user, topics in matrix.got.items():
        assert topics < everything, user
    assert not any(t.startswith("$SYS") for topics in matrix.got.values() for t in topics)


# ------------------------------------------------------------ other attacks
def test_client_id_takeover_is_impossible(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    dep = secure_deployment
    cloud = login(
        probes,
        secure_broker,
        dep,
        "cloud-b",
        client_id="cloud-b",
        clean_start=False,
        session_expiry=5,
    )
    cloud.subscribe(cloud_request_filter("takeover"))
    # Site A's gateway connects with the cloud's client id, asking for its session.
    # Without use_username_as_clientid Mosquitto 2.0 hands it over and drops the cloud.
    thief = login(probes, secure_broker, dep, "site-a.gw1", client_id="cloud-b", clean_start=False)
    assert not thief.connack_session_present
    gw = login(probes, secure_broker, dep, "site-b.gw1")
    gw.publish(request_topic("site-b", "gw1", "verify"), b"still mine")
    assert cloud.wait_for(request_topic("site-b", "gw1", "verify")) == b"still mine"
    assert not cloud.disconnected.is_set()
    assert thief.received(within=0) == []


def _die(probe: Probe) -> None:
    """Drop the TCP connection without DISCONNECT, so the broker fires the will."""
    probe.client.loop_stop()
    sock = probe.client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_last_will_cannot_target_another_site(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    dep = secure_deployment
    watcher = login(probes, secure_broker, dep, "site-b@integrator")
    watcher.subscribe("cipherface/v1/site-b/#")
    # The broker accepts the CONNECT but must drop a will it may not publish.
    _die(
        login(probes, secure_broker, dep, "site-a.gw2", will=(status_topic("site-b", "gw1"), b"x"))
    )
    assert watcher.received() == []
    # Control: site B's own gateway's will does arrive.
    _die(
        login(probes, secure_broker, dep, "site-b.gw1", will=(status_topic("site-b", "gw1"), b"y"))
    )
    assert watcher.wait_for(status_topic("site-b", "gw1")) == b"y"


def test_shared_group_must_not_mix_site_sets(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    """Mosquitto picks the group member first and checks its ACL second: a worker that
    does not serve a site swallows that site's requests. Hence the deployment rule:
    workers of one share group serve the same sites (docs/deployment.md)."""
    dep = secure_deployment
    group = cloud_request_filter("mixed")
    main_w = login(probes, secure_broker, dep, "cloud-main")
    only_b = login(probes, secure_broker, dep, "cloud-b")
    for w in (main_w, only_b):
        w.subscribe(group)
    gw = login(probes, secure_broker, dep, "site-a.gw2")
    for i in range(6):
        gw.publish(request_topic("site-a", "gw2", "verify"), str(i).encode())
    delivered = len(main_w.received()) + len(only_b.received(within=0))
    assert 0 < delivered < 6


def test_rotated_or_removed_account_is_cut_off_on_reload(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    dep = secure_deployment
    new, gone = dep.add_site("site-r", gateways=["gw1", "gw2"])
    user = new.username

    def attempt(password: str) -> int:
        p = Probe(port=secure_broker.port, username=user, password=password)
        try:
            return p.connect()
        finally:
            p.close()

    first = dep.password(user)
    assert attempt(first) in (0x86, 0x87)  # not loaded yet
    secure_broker.reload()
    time.sleep(0.3)
    assert attempt(first) == 0
    live = login(probes, secure_broker, dep, user)
    doomed = login(probes, secure_broker, dep, gone.username)
    for p in (live, doomed):
        p.client.reconnect_delay_set(min_delay=60)  # see the cut, not paho's retries
    gone_password = dep.password(gone.username)
    dep.rotate(user)
    dep.remove(gone.username)
    secure_broker.reload()
    # Mosquitto re-checks connected clients on reload: both are cut off at once.
    assert live.disconnected.wait(3) and doomed.disconnected.wait(3)
    probe = Probe(port=secure_broker.port, username=gone.username, password=gone_password)
    probes.append(probe)
    assert probe.connect() in (0x86, 0x87)
    assert attempt(first) in (0x86, 0x87)
    assert attempt(dep.password(user)) == 0


def test_server_certificate_renewal_on_reload(
    secure_broker: LocalBroker, secure_deployment: Deployment
) -> None:
    assert secure_broker.tls_port is not None

    def served_serial() -> int:
        ctx = ssl.create_default_context(cafile=str(secure_deployment.ca_cert_path))
        with (
            socket.create_connection(("127.0.0.1", secure_broker.tls_port or 0), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    secure_deployment.renew_server_cert()
    secure_broker.reload()
    time.sleep(0.3)
    after = served_serial()
    assert after != before
    certfile = secure_deployment.broker_files.certfile
    assert certfile is not None
    assert after == x509.load_pem_x509_certificate(certfile.read_bytes()).serial_number


def _mqtt5_publish_raw(port: int, username: str, password: str, topic: str, size: int) -> bytes:
    """CONNECT + one QoS 1 PUBLISH of ``size`` bytes over a bare socket; return the reply.

    paho-mqtt 2.2 cannot parse Mosquitto 2.0.11's answer to an over-size publish
    (PUBACK reason 0x95, not a PUBACK code in MQTT 5), drops the connection and
    resends forever: hence this hand-made client.
    """

    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    def string(v: str) -> bytes:
        raw = v.encode()
        return len(raw).to_bytes(2, "big") + raw

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # MQTT 5, flags: username + password + clean start, keepalive 30, no properties
        body = (
            b"\x00\x04MQTT\x05\xc2\x00\x1e\x00" + string("") + string(username) + string(password)
        )
        sock.sendall(b"\x10" + varint(len(body)) + body)
        connack = sock.recv(4096)
        assert connack[:1] == b"\x20" and connack[3] == 0, connack.hex()
        head = string(topic) + b"\x00\x01" + b"\x00"  # packet id 1, no properties
        sock.sendall(b"\x32" + varint(len(head) + size) + head)
        chunk = b"\0" * (1 << 20)
        left = size
        while left:
            left -= sock.send(chunk[: min(left, len(chunk))])
        return sock.recv(16)


@pytest.mark.slow
def test_largest_protocol_message_passes(
    secure_broker: LocalBroker, secure_deployment: Deployment, probes: list[Probe]
) -> None:
    dep = secure_deployment
    cloud = login(probes, secure_broker, dep, "cloud-main", tls=False)
    cloud.subscribe(cloud_request_filter())
    gw = login(probes, secure_broker, dep, "site-a.gw1", tls=False)
    topic = request_topic("site-a", "gw1", "enroll")
    big = os.urandom(1024) * (MAX_MESSAGE_BYTES // 1024)
    assert gw.publish(topic, big) < 0x80
    got = cloud.wait_for(topic, timeout=30)
    assert len(got) == MAX_MESSAGE_BYTES and got[:1024] == big[:1024]
    gw.close()  # the raw client below logs in as the same account
    # One byte over: refused (PUBACK, packet id 1, reason >= 0x80), never delivered.
    reply = _mqtt5_publish_raw(
        secure_broker.port, "site-a.gw1", dep.password("site-a.gw1"), topic, MAX_MESSAGE_BYTES + 1
    )
    assert reply[:1] == b"\x40" and reply[2:4] == b"\x00\x01" and reply[4] >= 0x80, reply.hex()
    assert cloud.received() == []


# ================================================================ dev broker
def test_restart_keeps_queued_requests(
    restartable_broker: LocalBroker, probes: list[Probe]
) -> None:
    b = restartable_broker
    topic = request_topic("site-a", "gw1", "verify")
    worker = Probe(port=b.port, client_id="worker-1", clean_start=False, session_expiry=600)
    assert worker.connect() == 0
    worker.subscribe(cloud_request_filter())
    worker.close()
    sender = Probe(port=b.port)
    probes.append(sender)
    assert sender.connect() == 0
    sender.publish(topic, b"queued while the worker was away")
    sender.close()
    b.restart()
    assert b.running and b.url == f"mqtt://127.0.0.1:{b.port}"
    back = Probe(port=b.port, client_id="worker-1", clean_start=False, session_expiry=600)
    probes.append(back)
    assert back.connect() == 0
    assert back.connack is not None
    assert back.wait_for(topic) == b"queued while the worker was away"


def test_dev_broker_fixture(broker: Any, probes: list[Probe]) -> None:
    scheme, host, port = parse_broker_url(broker.url)
    assert (scheme, host, port) == ("mqtt", broker.host, broker.port)
    p = Probe(port=broker.port)
    probes.append(p)
    assert p.connect() == 0  # anonymous: dev profile only
    p.subscribe("dev/echo")
    p.publish("dev/echo", b"hi")
    assert p.wait_for("dev/echo") == b"hi"


def test_local_broker_moves_off_a_taken_port() -> None:
    if broker_mod.mosquitto_binary() is None:
        pytest.skip(broker_mod.HOW_TO_GET_A_BROKER)
    b = LocalBroker()
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", b.port))  # someone takes the port meanwhile
            squatter.listen()
            taken = b.port
            b.start()
            assert b.running and b.port != taken
        b.restart()
        assert b.running
    finally:
        b.close()
    assert not b.workdir.exists()


def test_local_broker_reports_a_failed_start(tmp_path: Path) -> None:
    if broker_mod.mosquitto_binary() is None:
        pytest.skip(broker_mod.HOW_TO_GET_A_BROKER)
    bad = tmp_path / "bad.conf"
    bad.write_text("listener 1883 127.0.0.1\nno_such_option 1\n")
    with pytest.raises(BrokerUnavailableError, match=r"no_such_option|Unknown"):
        with LocalBroker(template=bad, startup_timeout=5):
            pass
