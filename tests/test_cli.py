"""The ``cipherface`` command line, each command its own process, on a real Mosquitto.

Edge commands read embeddings from .npy/.npz files, so these tests need no face
model; the photo path (``demo``, ``edge --watch``) is in the ``faces``-marked tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vectors import unit

from cipherface.agents import cli

DIM = 128
GW = "door-1"


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``cipherface ARGS...`` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "cipherface.agents.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@dataclass
class Setup:
    url: str
    site: str
    keys: Path
    data: Path
    work: Path
    agent_id: str
    cloud: subprocess.Popen[str] | None = None

    def edge(self, *args: str) -> list[str]:
        return [
            "--broker",
            self.url,
            "--keys",
            str(self.keys),
            "--site",
            self.site,
            "--gateway",
            GW,
            *args,
        ]

    def start_cloud(self) -> None:
        self.cloud = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cipherface.agents.cli",
                "cloud",
                "--broker",
                self.url,
                "--data",
                str(self.data),
                "--agent-id",
                self.agent_id,
                "--sites",
                self.site,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Ready when it says so on stderr (after its CONNACK and subscription).
        assert self.cloud.stderr is not None
        line = self.cloud.stderr.readline()
        assert "serving" in line, line

    def stop_cloud(self) -> None:
        if self.cloud is not None and self.cloud.poll() is None:
            self.cloud.send_signal(signal.SIGTERM)
            self.cloud.wait(timeout=20)
        self.cloud = None


@pytest.fixture(scope="module")
def setup(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("cli")
    s = Setup(
        url=broker.url,
        site=f"cli{secrets.token_hex(3)}",
        keys=work / "keys",
        data=work / "cloud",
        work=work,
        agent_id=f"cloud-cli-{secrets.token_hex(3)}",
    )
    done = run("keygen", "--out", str(s.keys), "--json")
    assert done.returncode == 0, done.stderr
    s.start_cloud()
    yield s
    s.stop_cloud()


def test_keygen_json_and_refuses_to_overwrite(setup: Setup) -> None:
    again = run("keygen", "--out", str(setup.keys), "--json")
    assert again.returncode == 3
    assert "key_file" in again.stderr and "Traceback" not in again.stderr
    assert oct((setup.keys / "private.key").stat().st_mode & 0o777) == "0o600"
    other = setup.work / "other-keys"
    made = run("keygen", "--out", str(other), "--json")
    info = json.loads(made.stdout)
    assert made.returncode == 0
    assert info["scheme"] == "ckks" and info["model"] == "Dlib" and info["dim"] == DIM
    assert len(info["key_id"]) == 32


def test_enroll_verify_identify_delete_across_processes(setup: Setup) -> None:
    rng = np.random.default_rng(7)
    people = unit(rng, 5)
    names = np.array(["ann", "ben", "cleo", "dan", "eve"])
    np.savez(setup.work / "bulk.npz", ids=names, embeddings=people)
    probe = people[2] + 0.002 * rng.normal(size=DIM)
    np.save(setup.work / "cleo.npy", probe)
    np.save(setup.work / "stranger.npy", unit(rng, 1)[0])
    np.save(setup.work / "fay.npy", unit(rng, 2))  # two embeddings of one person

    bulk = run("enroll", *setup.edge("--embeddings", str(setup.work / "bulk.npz"), "--json"))
    assert bulk.returncode == 0, bulk.stderr
    assert json.loads(bulk.stdout)["enrolled"] == 5
    one = run(
        "enroll", *setup.edge("--id", "fay", "--embedding", str(setup.work / "fay.npy"), "--json")
    )
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["enrolled"] == 1

    yes = run(
        "verify", *setup.edge("--id", "cleo", "--embedding", str(setup.work / "cleo.npy"), "--json")
    )
    assert yes.returncode == 0, yes.stderr
    got = json.loads(yes.stdout)
    assert got["match"] is True and got["identity"] == "cleo" and got["latency_ms"] > 0
    assert not {"score", "distance", "scores"} & got.keys()

    no = run(
        "verify",
        *setup.edge(
            "--id",
            "ben",
            "--embedding",
            str(setup.work / "cleo.npy"),
            "--json",
            "--mqtt-version",
            "3.1.1",
        ),
    )
    assert no.returncode == 0  # "no match" is a successful decision
    assert json.loads(no.stdout)["match"] is False

    who = run("identify", *setup.edge("--embedding", str(setup.work / "cleo.npy"), "--json"))
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout)["identity"] == "cleo"
    nobody = run("identify", *setup.edge("--embedding", str(setup.work / "stranger.npy")))
    assert nobody.returncode == 0 and "no match" in nobody.stdout

    listed = run("ids", *setup.edge("--json"))
    assert json.loads(listed.stdout)["ids"] == ["ann", "ben", "cleo", "dan", "eve", "fay"]

    gone = run("delete", *setup.edge("--id", "cleo", "--id", "zed", "--json"))
    assert gone.returncode == 0 and json.loads(gone.stdout)["deleted"] == 1
    after = run("identify", *setup.edge("--embedding", str(setup.work / "cleo.npy"), "--json"))
    assert json.loads(after.stdout) | {"latency_ms": 0} == json.loads(after.stdout) | {
        "identity": None,
        "match": False,
        "latency_ms": 0,
    }
    unknown = run(
        "verify", *setup.edge("--id", "cleo", "--embedding", str(setup.work / "cleo.npy"))
    )
    assert unknown.returncode == 3
    assert "unknown_identity" in unknown.stderr and "Traceback" not in unknown.stderr


def test_environment_variables_are_defaults(setup: Setup) -> None:
    rng = np.random.default_rng(8)
    v = unit(rng, 1)[0]
    np.save(setup.work / "gus.npy", v)
    env = {
        "CIPHERFACE_BROKER": setup.url,
        "CIPHERFACE_KEYS": str(setup.keys),
        "CIPHERFACE_SITE": setup.site,
        "CIPHERFACE_GATEWAY": "door-2",
    }
    enrolled = run("enroll", "--id", "gus", "--embedding", str(setup.work / "gus.npy"), env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    out = run(
        "verify", "--id", "gus", "--embedding", str(setup.work / "gus.npy"), "--json", env=env
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["match"] is True
    assert json.loads(out.stdout)["gateway"] == "door-2"


def test_request_queued_while_cloud_is_down(setup: Setup) -> None:
    rng = np.random.default_rng(9)
    v = unit(rng, 1)[0]
    np.save(setup.work / "hal.npy", v)
    setup.stop_cloud()
    try:
        waiting = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cipherface.agents.cli",
                "enroll",
                *setup.edge(
                    "--id",
                    "hal",
                    "--embedding",
                    str(setup.work / "hal.npy"),
                    "--json",
                    "--timeout",
                    "60",
                    "--retries",
                    "0",
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        assert waiting.poll() is None  # no cloud: still waiting
    finally:
        setup.start_cloud()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert json.loads(out)["enrolled"] == 1
    check = run(
        "verify", *setup.edge("--id", "hal", "--embedding", str(setup.work / "hal.npy"), "--json")
    )
    assert json.loads(check.stdout)["match"] is True


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["verify", "--keys", "k", "--site", "s", "--gateway", "g"],  # no --id
        ["frobnicate"],
        ["keygen", "--scheme", "rot13", "--out", "x"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert cli.main(args) == 2


def test_usage_errors_after_parsing_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("CIPHERFACE_KEYS", "CIPHERFACE_SITE", "CIPHERFACE_GATEWAY"):
        monkeypatch.delenv(var, raising=False)
    np.save(tmp_path / "v.npy", np.ones(DIM))
    assert cli.main(["verify", "--id", "x", "--keys", "k", "--site", "s", "--gateway", "g"]) == 2
    assert "PHOTO or --embedding" in capsys.readouterr().err
    both = ["verify", "--id", "x", "p.jpg", "--embedding", str(tmp_path / "v.npy")]
    assert cli.main([*both, "--keys", "k", "--site", "s", "--gateway", "g"]) == 2
    assert cli.main(["identify", "--embedding", str(tmp_path / "v.npy")]) == 2
    assert "--keys" in capsys.readouterr().err
    assert cli.main(["enroll", "--id", "x", "--keys", "k", "--site", "s", "--gateway", "g"]) == 2


def test_unreachable_broker_exits_3(setup: Setup, tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones(DIM))
    out = run(
        "identify",
        "--broker",
        "mqtt://127.0.0.1:9",
        "--keys",
        str(setup.keys),
        "--site",
        "s",
        "--gateway",
        "g",
        "--embedding",
        str(tmp_path / "v.npy"),
    )
    assert out.returncode == 3
    assert "broker_refused" in out.stderr and "Traceback" not in out.stderr


def _need_faces(*names: str) -> dict[str, Path]:
    """The photos, or skip when the edge extra, its weights or the photos are missing."""
    import importlib.util

    from cipherface.errors import LocalError
    from cipherface.faces import Embedder, find_photos

    for module in ("deepface", "dlib", "cv2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the edge extra ({module} missing)")
    try:
        Embedder().check_weights()
        return find_photos(names)
    except LocalError as exc:
        pytest.skip(f"needs the photos and weights of .ci/setup_data.sh: {exc}")


@pytest.mark.faces
def test_demo_runs_with_real_photos(broker: Any) -> None:
    _need_faces("obama", "obama2", "obama3", "biden", "astronaut")
    t0 = time.monotonic()
    out = run("demo", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    decisions = [r for r in records if r.get("step") == "decision"]
    assert len(decisions) == 4 and all(r["as_expected"] for r in decisions)
    assert [r["match"] for r in decisions] == [True, False, True, False]
    assert decisions[2]["identity"] == "obama"
    assert time.monotonic() - t0 < 60


@pytest.mark.faces
def test_edge_daemon_with_real_photos(setup: Setup) -> None:
    photos = _need_faces("obama", "obama2", "astronaut")
    enrolled = run("enroll", *setup.edge("--id", "obama", str(photos["obama"])))
    assert enrolled.returncode == 0, enrolled.stderr
    inbox = setup.work / "inbox"
    inbox.mkdir()
    for name in ("obama2", "astronaut"):
        (inbox / photos[name].name).write_bytes(photos[name].read_bytes())
    (inbox / "blank.png").write_bytes(photos["astronaut"].read_bytes()[:100])  # unreadable
    out = run(
        "edge",
        *setup.edge("--watch", str(inbox), "--max-photos", "3", "--poll", "0.1"),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = {r["event_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert lines["obama2.jpg"]["identity"] == "obama" and lines["obama2.jpg"]["match"] is True
    assert lines["astronaut.png"]["match"] is False
    assert lines["astronaut.png"]["event_type"] == "unknown"
    assert lines["blank.png"]["event_type"] == "error"
    assert lines["blank.png"]["error"] in ("image_unreadable", "no_face")
    assert (inbox / "done" / "obama2.jpg").exists()
    assert (inbox / "failed" / "blank.png").exists()


def test_bulk_enroll_from_a_photo_folder(setup: Setup) -> None:
    photos = _need_faces("obama", "obama2", "obama3", "biden")
    folder = setup.work / "staff"
    (folder / "barack").mkdir(parents=True)
    for name in ("obama", "obama2"):  # two photos of one person: averaged
        (folder / "barack" / photos[name].name).write_bytes(photos[name].read_bytes())
    (folder / "joe.jpg").write_bytes(photos["biden"].read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, reported, not fatal
    out = run("enroll", *setup.edge("--photo-dir", str(folder), "--no-progress", "--json"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["enrolled"], summary["identities"], summary["skipped"]) == (2, 2, 1)
    assert "broken.jpg" in out.stderr
    for identity, expected in (("barack", True), ("joe", False)):
        out = run("verify", *setup.edge("--id", identity, str(photos["obama3"]), "--json"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["match"] is expected
