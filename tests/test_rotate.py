"""``cipherface rotate-key`` end to end through a real Mosquitto (agents/rotate.py, the
cloud's gallery.export and key.retire in agents/cloud_rotate.py): every identity moves
to the new key with the same decisions, a kill -9 in the middle loses and duplicates
nothing, a forged export page is refused before anything is switched."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from vectors import near, unit

from cipherface.agents import cli
from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.rotate import RotationStatus, rotate_key
from cipherface.crypto import rekey, seal, sites
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.guard import load_guard
from cipherface.errors import PeerReportedError

DIM = 128
PEOPLE = 100
GW = "admin"


@dataclass
class Site:
    url: str
    name: str
    keys: Path
    cloud: CloudAgent
    work: Path
    faces: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)

    def client(self, keys: Path, gateway: str = "door") -> EdgeClient:
        cipher = sites.load_edge_cipher(keys)
        return EdgeClient(
            broker=BrokerConfig(url=self.url),
            cipher=cipher,
            guard=load_guard(keys, cipher, max_forged=10**6),
            site=self.name,
            gateway=gateway,
            timeout=10.0,
            publish_decisions=False,
        )

    def kid(self, keys: Path | None = None) -> str:
        return sites.load_edge_cipher(keys or self.keys).key_id

    def labels(self, kid: str) -> set[str]:
        return {x for x in self.cloud.keys.gallery(self.name, kid).ids() if x is not None}


@pytest.fixture
def site(broker: Any, tmp_path: Path) -> Iterator[Site]:
    """100 people enrolled at a fresh site (a bulk payload, single enrollments, deletions)."""
    name = f"rot{secrets.token_hex(3)}"
    keys = tmp_path / "keys"
    sites.generate_key_dir(keys, dim=DIM)
    cloud = CloudAgent(
        broker=BrokerConfig(url=broker.url),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(4)}",
        sites=[name],
        share_group=f"g{secrets.token_hex(4)}",
    )
    cloud.start()
    s = Site(url=broker.url, name=name, keys=keys, cloud=cloud, work=tmp_path)
    rng = np.random.default_rng(secrets.randbits(32))
    names = [f"person {i}" for i in range(PEOPLE + 1)]
    vecs = unit(rng, len(names))
    s.faces = dict(zip(names, vecs, strict=True))
    try:
        with s.client(keys) as edge:
            assert edge.enroll_bulk(names[:PEOPLE], vecs[:PEOPLE], progress=False) == PEOPLE
            for who in names[PEOPLE:]:  # a pack of its own
                edge.enroll(who, embeddings=s.faces[who])
            gone = names[3:PEOPLE:17]
            assert edge.delete(gone) == len(gone)
        s.live = sorted(set(names) - set(gone))
        yield s
    finally:
        cloud.stop()


Decisions = dict[str, tuple[bool | None, bool | None, bool | None]]


def _decisions(s: Site, keys: Path, people: list[str]) -> Decisions:
    """Per person: verify as themselves; as the next person (every 5th); identify (one of
    them and a stranger: 0.7 s each, its probe is d ciphertexts)."""
    rng = np.random.default_rng(5)
    out: Decisions = {}
    with s.client(keys) as edge:
        for i, who in enumerate(people):
            probe = near(s.faces[who], rng)
            other = ident = None
            if i % 5 == 0:
                other = edge.verify(people[(i + 1) % len(people)], vector=probe).match
            if i == len(people) // 2:
                hit = edge.identify(vector=probe)
                ident = hit.match and hit.identity == who
            out[who] = (edge.verify(who, vector=probe).match, other, ident)
        out["a stranger"] = (None, None, edge.identify(vector=unit(rng, 1)[0]).match)
    return out


def _names(s: Site, keys: Path) -> list[str]:
    with s.client(keys) as edge:
        return [x for x in edge.ids() if x is not None]


def _files_holding(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_rotate_key_end_to_end_through_the_broker(site: Site) -> None:
    old = site.kid()
    old_private = (site.keys / "private.key").read_bytes()
    old_trust = (site.keys / "trust.key").read_bytes()
    old_labels = site.labels(old)
    other_gateway = site.work / "gw2-keys"  # another gateway's copy of the old key
    shutil.copytree(site.keys, other_gateway)
    old_order = _names(site, site.keys)
    before = _decisions(site, site.keys, site.live)
    assert before.pop("a stranger") == (None, None, False)  # a sane population:
    assert all(me and not other for me, other, _ in before.values())
    assert [ident for _, _, ident in before.values() if ident is not None] == [True]

    seen: list[RotationStatus] = []
    t0 = time.perf_counter()
    report = rotate_key(
        broker=BrokerConfig(url=site.url),
        keys=site.keys,
        site=site.name,
        gateway=GW,
        page_packs=2,
        on_progress=seen.append,
    )
    spent = time.perf_counter() - t0
    new = site.kid()
    assert (report.old, report.new, report.moved) == (old, new, len(site.live)) and old != new
    copies = [st for st in seen if st.phase == "copy"]
    assert [st.packs_done for st in copies] == sorted(st.packs_done for st in copies)
    assert copies[-1].packs_done == copies[-1].packs_total and copies[-1].moved == len(site.live)
    assert [st.phase for st in seen[len(copies) :]] == ["switched", "retired", "done"]
    print(f"rotated {len(site.live)} identities in {spent:.2f} s, {len(copies)} pages")

    # The edge: the new key in place, the old one shredded, nothing left behind.
    assert sorted(p.name for p in site.work.iterdir() if p.name.startswith("keys")) == ["keys"]
    assert not (site.keys / "rotate.progress").exists()
    tree = site.work / "keys"
    assert not _files_holding(tree, old_private) and not _files_holding(tree, old_trust)
    assert oct((site.keys / "private.key").stat().st_mode & 0o777) == "0o600"
    # The cloud: only the new key and its gallery; the old one destroyed, tombstoned.
    data = site.work / "cloud" / site.name
    assert site.cloud.keys.kids(site.name) == [new] and site.cloud.keys.current(site.name) == new
    assert not (data / "keys" / old).exists() and (data / "retired" / old).is_file()
    # Same people, same decisions, under labels that share nothing with the old ones.
    new_order = _names(site, site.keys)
    assert sorted(new_order) == sorted(old_order) == site.live
    assert new_order != old_order  # each page re-enrolled in a fresh random order
    after = _decisions(site, site.keys, site.live)
    assert after.pop("a stranger") == (None, None, False) and after == before
    assert not site.labels(new) & old_labels

    # A gateway still on the old key is told so; the old gallery does not come back.
    with site.client(other_gateway, gateway="door2") as stale:
        with pytest.raises(PeerReportedError) as err:
            stale.verify(site.live[0], vector=site.faces[site.live[0]])
    assert err.value.remote_code == "key_retired"
    assert site.cloud.keys.kids(site.name) == [new] and site.cloud.keys.current(site.name) == new


def _cli_argv(s: Site, *extra: str) -> list[str]:
    return [
        "rotate-key",
        "--broker",
        s.url,
        "--keys",
        str(s.keys),
        "--site",
        s.name,
        "--gateway",
        GW,
        "--timeout",
        "10",
        *extra,
    ]


def test_rotate_key_resumes_after_kill_9_and_the_old_gallery_serves_meanwhile(
    site: Site,
) -> None:
    old = site.kid()
    copy = site.work / "gw2-keys"
    shutil.copytree(site.keys, copy)
    stop = threading.Event()
    served: list[bool] = []
    failures: list[BaseException] = []

    def keep_verifying() -> None:  # another gateway on the old key, during the rotation
        rng = np.random.default_rng(9)
        with site.client(copy, gateway="door2") as edge:
            i = 0
            while not stop.is_set():
                who = site.live[i % len(site.live)]
                try:
                    served.append(edge.verify(who, vector=near(site.faces[who], rng)).match)
                except BaseException as exc:
                    failures.append(exc)
                    return
                i += 1
                stop.wait(0.05)  # a door's pace, not a benchmark: leave the CPU to the rotation

    watcher = threading.Thread(target=keep_verifying, daemon=True)
    watcher.start()
    cmd = [sys.executable, "-m", "cipherface.agents.cli", *_cli_argv(site, "--page-packs", "1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert first.stderr is not None
    lines = []
    for line in first.stderr:
        lines.append(line)
        if line.startswith("rotate-key: page 1/"):
            first.send_signal(signal.SIGKILL)  # mid-copy: no cleanup of any kind
            break
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, "".join(lines) + first.stderr.read()
    stage = site.work / "keys.rotating"
    progress = json.loads((stage / "rotate.progress").read_text())
    assert site.kid() == old and progress["old"] == old  # nothing switched
    assert 1 <= progress["next"] and progress["moved"] < len(site.live)
    time.sleep(0.3)  # the old gallery still answers between the runs
    n_between = len(served)

    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=120)
    stop.set()
    watcher.join(timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["resumed"] and out["old_key"] == old and out["moved"] == len(site.live)
    # The old gallery served until its retirement (then: key_retired, nothing else).
    assert n_between > 0 and len(served) > n_between and all(served)
    assert all(getattr(e, "remote_code", None) == "key_retired" for e in failures), failures
    names = _names(site, site.keys)
    assert sorted(names) == site.live  # nothing lost, nothing twice
    assert site.cloud.keys.kids(site.name) == [out["new_key"]] and not stage.exists()
    rng = np.random.default_rng(3)
    with site.client(site.keys) as edge:
        for who in site.live[::9]:
            assert edge.verify(who, vector=near(site.faces[who], rng)).match


def test_a_forged_export_page_is_refused_and_nothing_switches(
    site: Site, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    old = site.kid()
    old_labels = site.labels(old)
    honest = rekey.export_packs

    def forged(gallery: CkksGallery, first: int, count: int) -> bytes:
        """The cloud adds 0.05 to every coefficient of the page's first pack (c0)."""
        page = msgpack.unpackb(honest(gallery, first, count), raw=False)
        b, j = divmod(first, gallery.npack)
        ring, pub, delta = gallery.ring, gallery.pub, gallery.params.delta
        c = ring.intt(np.array(gallery._block("pack", b)[j], dtype=np.uint64))
        shift = np.uint64(int(0.05 * delta))
        c[0] = (c[0] + shift) % ring.q[:, None]
        page["packs"][0] = seal.ciphertext_bytes(
            ring.ntt(c), parms_id=pub.data_level, scale=delta, compress=True
        )
        return bytes(msgpack.packb(page, use_bin_type=True))

    monkeypatch.setattr(rekey, "export_packs", forged)
    code = cli.main(_cli_argv(site, "--no-progress"))
    err = capsys.readouterr().err
    assert code == 3 and "[result_forged]" in err and "Traceback" not in err, err
    # Nothing switched: the edge keeps its key, the cloud its old gallery, which serves.
    assert site.kid() == old and (site.work / "keys.rotating").is_dir()
    assert site.labels(old) == old_labels
    guard = load_guard(site.keys, sites.load_edge_cipher(site.keys))
    assert guard is not None and guard.status().forged == 1
    with site.client(site.keys, gateway="door") as edge:
        who = site.live[1]
        assert edge.verify(who, vector=site.faces[who]).match

    guard.forged("test: two more")  # a halted gateway: rotation is its remedy
    guard.forged("test: three")
    assert guard.status().halted
    monkeypatch.setattr(rekey, "export_packs", honest)  # the cloud mends its ways
    assert cli.main(_cli_argv(site, "--no-progress", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resumed"] and out["moved"] == len(site.live) and site.kid() == out["new_key"]


@pytest.mark.slow
def test_rotate_key_through_the_secure_broker_acl(
    secure_broker: Any, secure_deployment: Any, tmp_path: Path
) -> None:
    """TLS, passwords and the generated ACL: a gateway account may export and retire its
    own site's gallery with no ACL change (`<site>/req/<gateway>/#`)."""

    def cfg(user: str) -> BrokerConfig:
        return BrokerConfig(
            url=secure_broker.tls_url,
            username=user,
            password=secure_deployment.password(user),
            ca_file=str(secure_deployment.ca_cert_path),
        )

    keys = tmp_path / "keys"
    sites.generate_key_dir(keys, dim=DIM)
    cipher = sites.load_edge_cipher(keys)
    faces = unit(np.random.default_rng(4), 3)
    cloud = CloudAgent(
        broker=cfg("cloud-main"),
        data_dir=tmp_path / "cloud",
        agent_id="cloud-main",
        sites=["site-a", "site-b"],
    )
    cloud.start()
    try:
        edge = EdgeClient(
            broker=cfg("site-a.gw1"),
            cipher=cipher,
            guard=load_guard(keys, cipher),
            site="site-a",
            gateway="gw1",
        )
        with edge:
            assert edge.enroll_bulk(["ann", "bob", "cy"], faces, progress=False) == 3
        report = rotate_key(broker=cfg("site-a.gw2"), keys=keys, site="site-a", gateway="gw2")
        assert report.moved == 3 and cloud.keys.kids("site-a") == [report.new]
        cipher = sites.load_edge_cipher(keys)
        edge = EdgeClient(
            broker=cfg("site-a.gw1"),
            cipher=cipher,
            guard=load_guard(keys, cipher),
            site="site-a",
            gateway="gw1",
            publish_decisions=False,
        )
        with edge:
            assert edge.verify("bob", vector=faces[1]).match
    finally:
        cloud.stop(retire=True)
