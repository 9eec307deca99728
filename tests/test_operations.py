"""Operating the agents: metrics, health, logs, and errors that name their cause.

* a cloud agent run by the CLI with ``--metrics-port`` and ``-v --log-format json``:
  scraped after real requests (counts by op and outcome, errors by code, latency
  histogram, queue depth, galleries, templates, duplicates); one JSON log line per
  request; ``cipherface health``; the retained JSON health message;
* the secure broker (project mosquitto.conf, TLS, ACL): a wrong password, a missing
  CA, an unknown host and a closed port each get their own code; an ACL-denied
  request fails at once; an integrator reads the cloud's status and health;
* a broker restart is logged at WARNING and counted; no cloud online is said per retry.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cipherface.agents.broker import LocalBroker, free_port
from cipherface.agents.deploy import Deployment
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig, Connection
from cipherface.crypto.sites import load_edge_cipher
from cipherface.errors import (
    BrokerAuthError,
    BrokerDnsError,
    BrokerRefusedError,
    BrokerTlsError,
    NoCloudError,
    PublishDeniedError,
)
from cipherface.observe.logs import JsonFormatter, RateLimit

DIM = 128


def cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cipherface.agents.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (labels matched as a subset); 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def retained(url: str, topic: str, **login: Any) -> bytes:
    got: queue.Queue[bytes] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ops-{secrets.token_hex(4)}")
    c.on_message = lambda _c, _u, m: got.put(m.payload)
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    c.connect(host, int(port))
    c.loop_start()
    try:
        c.subscribe(topic, 1)
        return got.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


@dataclass
class RunningCloud:
    proc: subprocess.Popen[str]
    port: int
    agent_id: str
    site: str
    keys: Path
    url: str
    work: Path

    def edge(self, *args: str) -> list[str]:
        return ["--broker", self.url, "--keys", str(self.keys), "--site", self.site,
                "--gateway", "gw1", *args]  # fmt: skip


@pytest.fixture(scope="module")
def running(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    work = tmp_path_factory.mktemp("ops")
    assert cli("keygen", "--out", str(work / "keys")).returncode == 0
    port, agent, site = (
        free_port(),
        f"cloud-ops-{secrets.token_hex(3)}",
        f"ops{secrets.token_hex(3)}",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cipherface.agents.cli", "-v", "--log-format", "json", "cloud",
         "--broker", broker.url, "--data", str(work / "data"), "--agent-id", agent,
         "--sites", site, "--metrics-port", str(port), "--health-interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "cloud.log", "w"),
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "serving" not in (work / "cloud.log").read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, (work / "cloud.log").read_text()
        time.sleep(0.2)
    try:
        yield RunningCloud(proc, port, agent, site, work / "keys", broker.url, work)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metrics_scraped_from_a_running_cloud(running: RunningCloud, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(3, DIM))
    np.savez(tmp_path / "bulk.npz", ids=np.array(["ann", "ben", "cleo"]), embeddings=vecs)
    np.save(tmp_path / "probe.npy", vecs[0])
    done = cli("enroll", *running.edge("--embeddings", str(tmp_path / "bulk.npz"), "--no-progress"))
    assert done.returncode == 0, done.stderr
    for _ in range(2):
        ok = cli("verify", *running.edge("--id", "ann", "--embedding", str(tmp_path / "probe.npy")))
        assert ok.returncode == 0 and "MATCH" in ok.stdout, ok.stderr
    bad = cli("verify", *running.edge("--id", "zed", "--embedding", str(tmp_path / "probe.npy")))
    assert bad.returncode == 3 and "[unknown_identity]" in bad.stderr, bad.stderr

    text = scrape(running.port)
    assert metric(text, "cipherface_requests_total", op="verify", outcome="result") == 2
    assert metric(text, "cipherface_requests_total", op="verify", outcome="error") == 1
    assert metric(text, "cipherface_requests_total", op="enroll", outcome="result") == 1
    assert metric(text, "cipherface_errors_total", code="unknown_identity") == 1
    assert metric(text, "cipherface_request_seconds_count", op="verify") == 3
    assert metric(text, "cipherface_request_seconds_bucket", op="verify", le="+Inf") == 3
    assert metric(text, "cipherface_galleries_open", role="cloud") == 1
    assert metric(text, "cipherface_templates", role="cloud") >= 3  # + the edge's canaries
    assert metric(text, "cipherface_broker_connected", role="cloud") == 1
    assert "cipherface_queue_depth{" in text and "cipherface_duplicates_total{" in text
    assert "cipherface_broker_reconnects_total{" in text
    # No --workers: the pool's metrics say so (0 configured, none running).
    assert metric(text, "cipherface_compute_workers", role="cloud") == 0
    assert metric(text, "cipherface_compute_workers_alive", role="cloud") == 0
    assert re.search(r'cipherface_info\{.*role="cloud".*\} 1\.0', text), text


def test_one_json_log_line_per_request(running: RunningCloud, tmp_path: Path) -> None:
    np.save(tmp_path / "probe.npy", np.ones(DIM))
    cli("identify", *running.edge("--embedding", str(tmp_path / "probe.npy")))
    time.sleep(0.5)
    lines = [json.loads(x) for x in (running.work / "cloud.log").read_text().splitlines()
             if x.startswith("{")]  # fmt: skip
    requests = [x for x in lines if x.get("logger") == "cipherface.requests"]
    identify = [x for x in requests if x["op"] == "identify"]
    assert identify, lines[-5:]
    line = identify[-1]
    assert (line["site"], line["gateway"], line["outcome"]) == (running.site, "gw1", "result")
    assert line["ms"] >= 0 and line["level"] == "INFO"


def test_edge_command_logs_one_line_per_request_at_v(running: RunningCloud, tmp_path: Path) -> None:
    np.save(tmp_path / "probe.npy", np.ones(DIM))
    out = cli("-v", "identify", *running.edge("--embedding", str(tmp_path / "probe.npy")))
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if "cipherface.requests" in x]
    assert any(f"edge identify site={running.site} gateway=gw1 outcome=result" in x
               for x in lines), out.stderr  # fmt: skip
    quiet = cli("identify", *running.edge("--embedding", str(tmp_path / "probe.npy")))
    assert "cipherface.requests" not in quiet.stderr, quiet.stderr


def test_health_command_and_endpoint(running: RunningCloud) -> None:
    ok = cli("health", "--url", f"127.0.0.1:{running.port}", "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["status"] == "ok" and doc["role"] == "cloud" and doc["agent"] == running.agent_id
    down = cli("health", "--url", f"127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "[unhealthy]" in down.stderr and "Traceback" not in down.stderr


def test_retained_json_health_with_load(running: RunningCloud) -> None:
    payload = retained(running.url, f"cipherface/v1/cloud/health/{running.agent_id}")
    doc = json.loads(payload)
    assert (doc["state"], doc["role"], doc["agent"]) == ("online", "cloud", running.agent_id)
    assert doc["version"] and abs(doc["ts"] / 1000 - time.time()) < 30
    assert {"queue_depth", "in_progress", "broker_connected"} <= set(doc["load"])
    # Every site's integrator reads it: nothing summed over other tenants' galleries.
    assert not {"galleries_open", "templates", "duplicates"} & set(doc["load"]), doc["load"]


# ------------------------------------------------------------ secure broker
def _cfg(broker: LocalBroker, dep: Deployment, user: str, **kw: Any) -> BrokerConfig:
    fields: dict[str, Any] = {
        "url": f"mqtts://127.0.0.1:{broker.tls_port}",
        "username": user,
        "password": dep.password(user),
        "ca_file": str(dep.ca_cert_path),
    }
    fields.update(kw)
    return BrokerConfig(**fields)


def _connect(cfg: BrokerConfig) -> None:
    conn = Connection(config=cfg, client_id=cfg.username or "anon")
    conn.start()
    conn.stop()


def test_connection_errors_name_the_cause(
    secure_broker: LocalBroker, secure_deployment: Deployment
) -> None:
    user = "site-b.gw1"
    _connect(_cfg(secure_broker, secure_deployment, user))  # control: it works
    with pytest.raises(BrokerAuthError, match="CIPHERFACE_PASSWORD"):
        _connect(_cfg(secure_broker, secure_deployment, user, password="wrong"))
    with pytest.raises(BrokerTlsError, match=r"does not verify.*CIPHERFACE_CA"):
        _connect(_cfg(secure_broker, secure_deployment, user, ca_file=None))
    with pytest.raises(BrokerTlsError, match="TLS listener"):
        _connect(_cfg(secure_broker, secure_deployment, user,
                      url=f"mqtts://127.0.0.1:{secure_broker.port}"))  # fmt: skip
    with pytest.raises(BrokerDnsError, match="cannot resolve"):
        _connect(_cfg(secure_broker, secure_deployment, user, url="mqtts://no-such-host.invalid"))
    with pytest.raises(BrokerRefusedError, match="refused"):
        _connect(
            _cfg(secure_broker, secure_deployment, user, url=f"mqtts://127.0.0.1:{free_port()}")
        )


def test_cli_wrong_password_is_one_line(
    secure_broker: LocalBroker, secure_deployment: Deployment, tmp_path: Path
) -> None:
    assert cli("keygen", "--out", str(tmp_path / "k")).returncode == 0
    out = cli(
        "ids", "--broker", f"mqtts://127.0.0.1:{secure_broker.tls_port}",
        "--ca-file", str(secure_deployment.ca_cert_path), "--username", "site-b.gw1",
        "--keys", str(tmp_path / "k"), "--site", "site-b", "--gateway", "gw1",
        env={"CIPHERFACE_PASSWORD": "wrong"},
    )  # fmt: skip
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 3 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error [broker_auth]") and "CIPHERFACE_PASSWORD" in lines[0]


def test_acl_denied_request_fails_at_once(
    secure_broker: LocalBroker, secure_deployment: Deployment, tmp_path: Path
) -> None:
    assert cli("keygen", "--out", str(tmp_path / "k")).returncode == 0
    cfg = _cfg(secure_broker, secure_deployment, "site-a.gw2")
    # site-a.gw2 may publish only on site-a/req/gw2/#: asking as gw1 is denied.
    edge = EdgeClient(
        broker=cfg, cipher=load_edge_cipher(tmp_path / "k"), site="site-a", gateway="gw1",
        timeout=20, retries=2, client_id="site-a.gw2",
    )  # fmt: skip
    with edge:
        t0 = time.monotonic()
        with pytest.raises(PublishDeniedError, match="ACL"):
            edge.ids()
        assert time.monotonic() - t0 < 5


def test_integrator_reads_cloud_status_and_health(
    secure_broker: LocalBroker, secure_deployment: Deployment
) -> None:
    from cipherface.agents.cloud import CloudAgent
    from cipherface.agents.observed import cloud_health, observe_cloud

    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    user = "site-a@integrator"
    reader = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user)
    reader.username_pw_set(user, secure_deployment.password(user))
    reader.tls_set(ca_certs=str(secure_deployment.ca_cert_path))
    reader.on_message = lambda _c, _u, m: got.put((m.topic, m.payload))
    cfg = _cfg(secure_broker, secure_deployment, "cloud-b")
    with tempfile.TemporaryDirectory() as data:
        agent = CloudAgent(broker=cfg, data_dir=data, agent_id="cloud-b", sites=["site-b"])
        observed = observe_cloud(agent)
        with agent:
            observed.start_health(cloud_health(agent, interval=60))
            reader.connect("127.0.0.1", secure_broker.tls_port or 0)
            reader.loop_start()
            reader.subscribe(
                [("cipherface/v1/cloud/status/+", 1), ("cipherface/v1/cloud/health/+", 1)]
            )
            topics: dict[str, bytes] = {}
            deadline = time.monotonic() + 10
            wanted = {"cipherface/v1/cloud/status/cloud-b", "cipherface/v1/cloud/health/cloud-b"}
            while not wanted <= set(topics) and time.monotonic() < deadline:
                try:
                    t, p = got.get(timeout=0.5)
                except queue.Empty:
                    continue
                topics[t] = p
            observed.stop()
        reader.disconnect()
        reader.loop_stop()
    _clear_retained(secure_broker, secure_deployment, "cloud-b")
    assert "cipherface/v1/cloud/status/cloud-b" in topics
    health = json.loads(topics["cipherface/v1/cloud/health/cloud-b"])
    assert health["role"] == "cloud" and "queue_depth" in health["load"]


def _clear_retained(broker: LocalBroker, dep: Deployment, user: str) -> None:
    """Empty the retained status and health of ``user`` (the broker is shared by the
    session: test_deployment's ACL matrix counts every retained message)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user)
    c.username_pw_set(user, dep.password(user))
    c.tls_set(ca_certs=str(dep.ca_cert_path))
    c.connect("127.0.0.1", broker.tls_port or 0)
    c.loop_start()
    try:
        for kind in ("status", "health"):
            c.publish(
                f"cipherface/v1/cloud/{kind}/{user}", b"", qos=1, retain=True
            ).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


# ------------------------------------------------------ reconnects, no cloud
def test_broker_restart_is_logged_and_counted(
    restartable_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    conn = Connection(config=BrokerConfig(url=restartable_broker.url), client_id="ops-reconnect")
    conn.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cipherface.agents.mqtt"):
            restartable_broker.restart()
            deadline = time.monotonic() + 30
            while conn.reconnects < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
        assert conn.reconnects == 1 and conn.connected
        text = caplog.text
        assert "lost the connection" in text and "restored after" in text
    finally:
        conn.stop()


def test_no_cloud_online_is_said_per_retry(
    restartable_broker: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert cli("keygen", "--out", str(tmp_path / "k")).returncode == 0
    edge = EdgeClient(
        broker=BrokerConfig(url=restartable_broker.url), cipher=load_edge_cipher(tmp_path / "k"),
        site="nocloud", gateway="gw1", timeout=0.5, retries=2,
    )  # fmt: skip
    with edge, caplog.at_level(logging.WARNING, logger="cipherface.agents.edge"):
        with pytest.raises(NoCloudError, match="no cloud agent is online"):
            edge.ids()
    lines = [r for r in caplog.records if "no cloud agent is online" in r.getMessage()]
    # Said at once from the retained statuses, then once per attempt.
    assert len(lines) == 4, [r.getMessage() for r in lines]
    assert "waiting up to 1.5 s" in lines[0].getMessage()


def test_cli_no_cloud_exit_3_one_line(restartable_broker: LocalBroker, tmp_path: Path) -> None:
    assert cli("keygen", "--out", str(tmp_path / "k")).returncode == 0
    out = cli("ids", "--broker", restartable_broker.url, "--keys", str(tmp_path / "k"),
              "--site", "s", "--gateway", "g", "--timeout", "0.5", "--retries", "1")  # fmt: skip
    assert out.returncode == 3
    errors = [x for x in out.stderr.splitlines() if x.startswith("error [")]
    assert errors == [errors[0]] and "[no_cloud]" in errors[0], out.stderr
    assert out.stderr.count("no cloud agent is online") == 4  # at once, 2 attempts, error


# -------------------------------------------------------------- log helpers
def test_rate_limit_keeps_a_flood_out_of_the_log() -> None:
    limit = RateLimit(burst=3, period=0.5)

    def rec(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("cloud", level, __file__, 1, msg, (), None)

    assert [limit.filter(rec("dropped %r")) for _ in range(10)] == [True] * 3 + [False] * 7
    assert limit.filter(rec("another %r"))  # another template has its own budget
    assert limit.filter(rec("dropped %r", logging.INFO))  # INFO is never limited
    time.sleep(0.6)
    after = rec("dropped %r")
    assert limit.filter(after) and "7 similar message(s) suppressed" in str(after.msg)


def test_json_formatter_one_object_per_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "a %s", ("b",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert (doc["msg"], doc["level"]) == ("a b", "ERROR") and "boom" in doc["exc"]


# ------------------------------------------------------------------- papercuts
@pytest.mark.faces
def test_demo_on_a_broker_with_a_cloud_agent_uses_it(broker: Any, tmp_path: Path) -> None:
    """Two agents in one shared-subscription group would split the demo's requests
    (key_mismatch); the demo reads the retained statuses and uses the running one."""
    import importlib.util

    from cipherface.agents.cloud import CloudAgent
    from cipherface.errors import LocalError
    from cipherface.faces import Embedder, find_photos

    for module in ("deepface", "dlib", "cv2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the edge extra ({module} missing)")
    try:
        Embedder().check_weights()
        find_photos(["obama", "obama2", "obama3", "biden", "astronaut"])
    except LocalError as exc:
        pytest.skip(f"needs the photos and weights of .ci/setup_data.sh: {exc}")
    agent_id = f"cloud-ops-demo-{secrets.token_hex(3)}"
    with CloudAgent(broker=BrokerConfig(url=broker.url), data_dir=tmp_path, agent_id=agent_id):
        out = cli("demo", "--broker", broker.url, "--json", timeout=180)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    cloud = next(r for r in records if r.get("step") == "cloud")
    assert agent_id in cloud["agents"], cloud
    decisions = [r for r in records if r.get("step") == "decision"]
    assert len(decisions) == 4 and all(r["as_expected"] for r in decisions)


# ---------------------------------------------------------- shipped files, docs
REPO = Path(__file__).resolve().parents[1]


def test_compose_healthchecks_probe_the_agents() -> None:
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("cloud", "edge"):
        svc = services[name]
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "cipherface", "health"], test
        port = svc["environment"]["CIPHERFACE_METRICS_PORT"]
        assert test[-1] == f"127.0.0.1:{port}", test


def test_systemd_units_parse_with_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from cipherface.agents.cli import build_parser

    units = sorted((REPO / "docs" / "systemd").glob("*.service"))
    assert len(units) == 2
    for unit in units:
        lines = unit.read_text().splitlines()
        env = dict(
            line.removeprefix("Environment=").split("=", 1)
            for line in lines
            if line.startswith("Environment=")
        )
        assert any(line.startswith("EnvironmentFile=") for line in lines)  # the password
        assert not any("--password" in line for line in lines)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        exec_start = next(x for x in lines if x.startswith("ExecStart=")).split()[1:]
        args = build_parser().parse_args(exec_start)
        assert args.metrics_port == int(env["CIPHERFACE_METRICS_PORT"])
        assert args.log_format == "json" and args.verbose == 1
        if args.command == "cloud":  # a worker that stood down is not started again
            from cipherface.agents.cli import EXIT_REPLACED

            assert f"RestartPreventExitStatus={EXIT_REPLACED}" in lines


def test_documented_dev_broker_config_ships_and_runs(tmp_path: Path) -> None:
    import shutil

    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    named = set(re.findall(r"mosquitto -c (\S+)", docs))
    assert named and all((REPO / n).is_file() for n in named), named
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if binary is None:
        pytest.skip("no mosquitto binary")
    port = free_port()
    conf = (
        (REPO / "mosquitto-dev.conf")
        .read_text()
        .replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
    )
    (tmp_path / "dev.conf").write_text(conf + "\nuser root\n")
    proc = subprocess.Popen([binary, "-c", "dev.conf"], cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            conn = Connection(config=BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id="dev")
            try:
                conn.start()
                conn.stop()  # else paho retries a broker gone after the test, logging on
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_invalid_topic_flood_is_rate_limited(running: RunningCloud) -> None:
    """Each message on an invalid request topic used to write one WARNING line."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ops-flood-{secrets.token_hex(3)}")
    host, port = running.url.removeprefix("mqtt://").rsplit(":", 1)
    c.connect(host, int(port))
    c.loop_start()
    try:
        topic = f"cipherface/v1/{running.site}/req/BAD-GW/verify"  # matches +, invalid id
        for _ in range(40):
            c.publish(topic, b"x", qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = scrape(running.port)
        if metric(text, "cipherface_requests_total", op="invalid_topic") >= 40:
            break
        time.sleep(0.2)
    assert metric(scrape(running.port), "cipherface_requests_total", op="invalid_topic") == 40
    warnings = [
        line for line in (running.work / "cloud.log").read_text().splitlines()
        if "BAD-GW" in line and '"WARNING"' in line
    ]  # fmt: skip
    assert 1 <= len(warnings) <= 5, warnings


def test_help_and_usage_name_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from cipherface.agents import cli as cli_module

    for command in ("verify", "cloud"):
        assert cli_module.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "CIPHERFACE_PASSWORD" in out and "ps" in out, out
        assert "required" in out, out  # --keys/--site/--gateway, --data
    code = cli_module.main(["ids", "--site", "s", "--gateway", "g"])
    err = capsys.readouterr().err
    assert code == 2 and "--keys (or env CIPHERFACE_KEYS)" in err, err


def test_ctrl_c_during_bulk_enroll_says_what_was_committed(
    running: RunningCloud, tmp_path: Path
) -> None:
    import signal

    n = 3 * 4096  # three payloads of one block each
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "many.npz",
        ids=np.array([f"p{i:05d}" for i in range(n)]),
        embeddings=rng.normal(size=(n, DIM)),
    )
    before = metric(
        scrape(running.port), "cipherface_requests_total", op="enroll", outcome="result"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cipherface.agents.cli", "enroll", *running.edge(
            "--embeddings", str(tmp_path / "many.npz"), "--no-progress")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = metric(
            scrape(running.port), "cipherface_requests_total", op="enroll", outcome="result"
        )
        if done > before:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the bulk enroll finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: the cloud confirmed" in err and f"of {n} identities" in err, err
    assert "p00000" in err and "Traceback" not in err, err


@pytest.mark.faces
def test_metrics_scraped_from_a_running_edge_daemon(running: RunningCloud, tmp_path: Path) -> None:
    import importlib.util
    import signal

    from cipherface.errors import LocalError
    from cipherface.faces import Embedder, find_photos

    for module in ("deepface", "dlib", "cv2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the edge extra ({module} missing)")
    try:
        Embedder().check_weights()
        photos = find_photos(["obama", "obama2", "astronaut"])
    except LocalError as exc:
        pytest.skip(f"needs the photos and weights of .ci/setup_data.sh: {exc}")
    done = cli("enroll", *running.edge("--id", "obama", str(photos["obama"])))
    assert done.returncode == 0, done.stderr
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("obama2", "astronaut"):
        (inbox / photos[name].name).write_bytes(photos[name].read_bytes())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cipherface.agents.cli", "edge", *running.edge(
            "--watch", str(inbox), "--poll", "0.1", "--metrics-port", str(port),
            "--health-interval", "1")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, text = time.monotonic() + 120, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = scrape(port)
            except OSError:
                text = ""
            if metric(text, "cipherface_outcomes_total") >= 2:
                break
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert metric(text, "cipherface_outcomes_total", event_type="match") == 1, text
        assert metric(text, "cipherface_outcomes_total", event_type="unknown") == 1, text
        assert metric(text, "cipherface_requests_total", role="edge", op="identify") >= 2
        assert metric(text, "cipherface_request_seconds_count", role="edge", op="identify") >= 2
        assert metric(text, "cipherface_broker_connected", role="edge") == 1
        assert cli("health", "--url", f"127.0.0.1:{port}", "-q").returncode == 0
        doc = json.loads(retained(running.url, f"cipherface/v1/{running.site}/health/gw1"))
        assert (doc["role"], doc["state"]) == ("edge", "online") and "outcomes" in doc["load"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_peer_chosen_error_codes_cannot_grow_the_metrics(tmp_path: Path) -> None:
    """A cloud can answer with any code string: the edge's labels stay bounded."""
    from cipherface.agents.observed import observe_edge

    assert cli("keygen", "--out", str(tmp_path / "k")).returncode == 0
    edge = EdgeClient(
        broker=BrokerConfig(), cipher=load_edge_cipher(tmp_path / "k"), site="s", gateway="g"
    )
    observed, _ = observe_edge(edge)
    assert edge.on_request is not None
    for i in range(500):
        edge.on_request("verify", f"evil_{i}", 0.01)
    edge.on_request("verify", "unknown_identity", 0.01)
    text = observed.metrics.exposition().decode()
    errors = [x for x in text.splitlines() if x.startswith("cipherface_errors_total{")]
    assert len(errors) == 2, errors
    assert metric(text, "cipherface_errors_total", code="other") == 500
    assert metric(text, "cipherface_errors_total", code="unknown_identity") == 1


# ------------------------------------------------------------ compute workers
def _healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return dict(json.loads(r.read()))


def test_compute_pool_metrics_follow_a_killed_worker(broker: Any, tmp_path: Path) -> None:
    """A cloud with ``workers=2`` on its real /metrics endpoint: workers configured and
    alive, jobs by kind; a worker killed with SIGKILL (while idle) shows as one fewer
    alive, one restart, then two alive again; /healthz carries the same levels."""
    import signal

    from cipherface.agents.cloud import CloudAgent
    from cipherface.agents.observed import observe_cloud
    from cipherface.crypto.sites import generate_key_dir

    generate_key_dir(tmp_path / "keys", dim=DIM)
    cipher = load_edge_cipher(tmp_path / "keys")
    site = f"cw{secrets.token_hex(3)}"
    agent = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(4)}",
        workers=2,
    )
    observed = observe_cloud(agent, port=free_port())
    assert observed.server is not None
    port = observed.server.port
    agent.start()
    try:
        text = scrape(port)
        assert metric(text, "cipherface_compute_workers", role="cloud") == 2
        assert metric(text, "cipherface_compute_workers_alive", role="cloud") == 2
        assert "cipherface_compute_worker_restarts_total{" in text
        assert metric(text, "cipherface_compute_worker_restarts_total") == 0
        people = np.random.default_rng(9).normal(size=(3, DIM))
        with EdgeClient(broker=BrokerConfig(url=broker.url), cipher=cipher, site=site,
                        gateway="gw1", timeout=20.0) as edge:  # fmt: skip
            edge.publish_key()
            edge.enroll_bulk(["ann", "ben", "cleo"], people, progress=False)
            assert edge.verify("ben", vector=people[1]).match
            assert edge.identify(vector=people[2]).identity == "cleo"
        text = scrape(port)
        assert metric(text, "cipherface_compute_jobs_total", kind="verify") >= 1
        assert metric(text, "cipherface_compute_jobs_total", kind="identify") >= DIM
        assert "cipherface_compute_local_jobs_total{" in text
        assert metric(text, "cipherface_compute_local_jobs_total") == 0

        assert agent.pool is not None
        victim = agent.pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        seen: list[tuple[float, float]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = scrape(port)
            alive = metric(text, "cipherface_compute_workers_alive", role="cloud")
            restarts = metric(text, "cipherface_compute_worker_restarts_total", role="cloud")
            seen.append((alive, restarts))
            if restarts == 1 and alive == 2:
                break
            time.sleep(0.05)
        assert (1.0, 1.0) in seen, seen[:5]  # one fewer alive once the restart counted
        assert seen[-1] == (2.0, 1.0), seen[-5:]  # then its successor runs
        assert victim not in agent.pool.pids()
        load = _healthz(port)["load"]
        assert load["compute_workers"] == 2 and load["compute_workers_alive"] == 2
        assert load["compute_worker_restarts"] == 1
        assert load["compute_jobs"]["identify"] >= DIM
    finally:
        agent.stop(retire=True)
        observed.stop()
