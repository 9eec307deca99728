"""rotate-key without a broker: the cloud's side (``CloudAgent.handle``: export pages
are the engine's own, key.retire destroys the old gallery's rows and files and only
once its successor is current, a retired key never comes back), the protocol's checks
on both messages, shredding, the key directory switch, the CLI's refusals."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import storekit
from vectors import unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import rekey, sites
from cipherface.crypto.ckks import CkksEdgeCipher
from cipherface.crypto.guard import Guard, load_guard
from cipherface.errors import DecodeError, InvalidArgumentError, ValidationError
from cipherface.protocol import (
    MAX_EXPORT_PACKS,
    MAX_SLOTS,
    Enroll,
    Error,
    GalleryExport,
    KeyPublish,
    KeyRetire,
    Result,
    Verify,
    decode,
    encode,
    request_topic,
)
from cipherface.store import gallery_location, store_exists
from cipherface.store.erase import shred_tree

DIM = 128
KID = "0123456789abcdef0123456789abcdef"
pg_url = storekit.pg_url  # fixture: a PostgreSQL database of this session's own

Key = tuple[CkksEdgeCipher, Guard, bytes]


def _key(directory: Path) -> Key:
    sites.generate_key_dir(directory, dim=DIM)
    cipher = sites.load_edge_cipher(directory)
    guard = load_guard(directory, cipher)
    assert isinstance(cipher, CkksEdgeCipher) and guard is not None
    return cipher, guard, (directory / sites.PRIVATE_NAME).read_bytes()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Key, Key]:
    base = tmp_path_factory.mktemp("rotkeys")
    return _key(base / "old"), _key(base / "new")


@pytest.fixture(params=["sqlite", "postgresql"])
def agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CloudAgent]:
    store = "sqlite:" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    cloud = CloudAgent(
        broker=BrokerConfig(url="mqtt://127.0.0.1:1"),  # never started: handle() only
        data_dir=tmp_path / "cloud",
        store=store,
    )
    yield cloud
    cloud.keys.close()


def _ask(agent: CloudAgent, msg: Any, *, raw: bool = False) -> Any:
    [out] = agent.handle(request_topic(msg.site, msg.gw, msg.TYPE), encode(msg))
    return out.payload if raw else decode(out.payload)


def _publish(agent: CloudAgent, site: str, cipher: CkksEdgeCipher) -> None:
    msg = KeyPublish(
        site=site,
        gw="gw",
        kid=cipher.key_id,
        scheme="ckks",
        public_key=cipher.public_key_bytes(),
    )
    assert isinstance(_ask(agent, msg), Result)


def _code(reply: Any) -> str:
    assert isinstance(reply, Error), reply
    return reply.code


def test_export_pages_and_retire(agent: CloudAgent, keys: tuple[Key, Key]) -> None:
    (ocipher, oguard, _), (ncipher, _, _) = keys
    site, old, new = f"s{secrets.token_hex(3)}", ocipher.key_id, ncipher.key_id
    hdr: dict[str, Any] = {"site": site, "gw": "gw"}
    _publish(agent, site, ocipher)
    names = [f"n{i}" for i in range(40)]
    vecs = unit(np.random.default_rng(1), 41)
    for batch, rows in ((names, vecs[:40]), (["single"], vecs[40:])):  # 2 packs, then 1
        labels, tmpl = oguard.with_canaries(batch, rows)
        enroll = Enroll(**hdr, kid=old, ids=tuple(labels), payload=ocipher.encrypt_templates(tmpl))
        assert isinstance(_ask(agent, enroll), Result)

    # Pages are the engine's export, byte for byte; paging covers the gallery once.
    gallery = agent.keys.gallery(site, old)
    page = _ask(agent, GalleryExport(**hdr, kid=old, first=0, count=2))
    assert (page.op, page.count, page.offset, page.total) == ("gallery.export", 2, 0, 3)
    assert page.scores == rekey.export_packs(gallery, 0, 2)
    last = _ask(agent, GalleryExport(**hdr, kid=old, first=2, count=MAX_EXPORT_PACKS))
    assert (last.count, last.offset, last.total) == (1, 2, 3)
    seen = [n for p in (page, last) for n, _ in rekey.open_export(ocipher, oguard, p.scores)[2]]
    assert sorted(seen) == sorted([*names, "single"])
    for first in (3, 99):  # past the end: the empty page at offset = total
        end = _ask(agent, GalleryExport(**hdr, kid=old, first=first, count=5))
        assert (end.count, end.offset, end.total) == (0, 3, 3)
        assert rekey.open_export(ocipher, oguard, end.scores)[2] == []
    agent.max_reply_bytes = len(encode(page)) - 1  # a page that does not fit is halved
    assert _ask(agent, GalleryExport(**hdr, kid=old, first=0, count=2)).count == 1
    agent.max_reply_bytes = 1000  # not even one pack fits
    assert _code(_ask(agent, GalleryExport(**hdr, kid=old, first=0, count=2))) == "too_large"
    assert _code(_ask(agent, GalleryExport(**hdr, kid=KID, first=0, count=2))) == "key_mismatch"

    # Retire: never the current key, never to a successor that is not current.
    assert _code(_ask(agent, KeyRetire(**hdr, kid=old, successor=new))) == "key_in_use"
    _publish(agent, site, ncipher)
    assert _code(_ask(agent, KeyRetire(**hdr, kid=new, successor=old))) == "key_in_use"
    _publish(agent, site, ocipher)  # a gateway republishes the old key: current again
    assert _code(_ask(agent, KeyRetire(**hdr, kid=old, successor=new))) == "key_in_use"
    _publish(agent, site, ncipher)
    location = gallery_location(agent.keys.store, site, old, agent.data_dir)
    assert store_exists(location)
    retire = KeyRetire(**hdr, kid=old, successor=new)
    first = _ask(agent, retire, raw=True)
    done = decode(first)
    assert isinstance(done, Result) and (done.op, done.deleted) == ("key.retire", 1)
    assert not store_exists(location) and not agent.keys.key_dir(site, old).exists()
    assert (agent.data_dir / site / "retired" / old).read_text() == f"{new}\n"
    assert agent.keys.kids(site) == [new] and agent.keys.current(site) == new
    assert _ask(agent, retire, raw=True) == first  # a redelivery: the same reply
    again = _ask(agent, KeyRetire(**hdr, kid=old, successor=new))  # a rerun: idempotent
    assert isinstance(again, Result) and again.deleted == 0
    # The old key can never come back, and nothing answers under it.
    msg = KeyPublish(**hdr, kid=old, scheme="ckks", public_key=ocipher.public_key_bytes())
    assert _code(_ask(agent, msg)) == "key_retired"
    probe = ocipher.encrypt_probe(vecs[0], op="verify")
    assert _code(_ask(agent, Verify(**hdr, kid=old, identity=oguard.seal("n0"), probe=probe))) == (
        "key_retired"  # every request under it: the gateway is told to load the new key
    )
    assert agent.keys.kids(site) == [new] and not store_exists(location)


def test_export_of_a_paillier_gallery_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "phe"
    kid = sites.generate_key_dir(d, scheme="paillier", dim=DIM, security_level=112)
    agent = CloudAgent(broker=BrokerConfig(url="mqtt://127.0.0.1:1"), data_dir=tmp_path / "c")
    msg = KeyPublish(
        site="s", gw="g", kid=kid, scheme="paillier", public_key=(d / "public.key").read_bytes()
    )
    assert isinstance(_ask(agent, msg), Result)
    assert _code(_ask(agent, GalleryExport(site="s", gw="g", kid=kid))) == "gallery_error"
    agent.keys.close()


def test_shredding_overwrites_before_unlinking(tmp_path: Path) -> None:
    tree = tmp_path / "old-key"
    (tree / "sub").mkdir(parents=True)
    secret = secrets.token_bytes(5000)
    (tree / "private.key").write_bytes(secret)
    (tree / "sub" / "x").write_bytes(secret)
    (tree / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_bytes(b"keep me")
    fd = open(tree / "private.key", "rb")  # read what the inode holds after
    assert shred_tree(tree) and not tree.exists()
    assert fd.read() == bytes(len(secret))  # zeros, not the secret, were left behind
    fd.close()
    assert (tmp_path / "outside").read_bytes() == b"keep me"  # a link is not followed
    assert not shred_tree(tree)  # idempotent


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: GalleryExport(site="s", gw="g", kid=KID, count=0), "count"),
        (lambda: GalleryExport(site="s", gw="g", kid=KID, count=MAX_EXPORT_PACKS + 1), "count"),
        (lambda: GalleryExport(site="s", gw="g", kid=KID, first=-1), "first"),
        (lambda: GalleryExport(site="s", gw="g", kid=KID, first=MAX_SLOTS + 1), "first"),
        (lambda: GalleryExport(site="s", gw="g", kid=None), "kid"),
        (lambda: KeyRetire(site="s", gw="g", kid=KID, successor=KID), "differ"),
        (lambda: KeyRetire(site="s", gw="g", kid=KID, successor="ABC"), "successor"),
        (lambda: KeyRetire(site="s", gw="g", kid=None, successor=KID), "kid"),
        (lambda: _export_result(scores=None, count=0, offset=1), "required"),
        (lambda: _export_result(total=None), "required"),
        (lambda: _export_result(ids=("a",)), "ids"),
        (lambda: _export_result(count=3, offset=0, total=2), "past total"),
        (lambda: _export_result(count=0, offset=0, total=2), "empty page"),
        (lambda: _export_result(count=MAX_EXPORT_PACKS + 1, total=MAX_SLOTS), "count"),
    ],
)
def test_rotation_messages_refuse_bad_fields(factory: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        factory()


def _export_result(**kw: Any) -> Result:
    fields: dict[str, Any] = {"op": "gallery.export", "ids_version": 1, "scores": b"p"}
    fields.update({"count": 1, "offset": 0, "total": 1, **kw})
    if fields.get("ids") is not None:
        fields["count"] = len(fields["ids"])
    return Result(site="s", gw="g", kid=KID, corr=KID, **fields)


def test_rotation_messages_on_the_wire() -> None:
    import msgpack

    wire = msgpack.unpackb(encode(GalleryExport(site="s", gw="g", kid=KID)), raw=False)
    assert wire["t"] == "gallery.export" and wire["b"] == {"first": 0, "count": 1}
    wire["b"]["count"] = 5000
    with pytest.raises(ValidationError):
        decode(msgpack.packb(wire, use_bin_type=True))
    wire["b"]["count"] = "all"
    with pytest.raises(DecodeError):
        decode(msgpack.packb(wire, use_bin_type=True))
    assert request_topic("s", "g", "gallery.export") == "cipherface/v1/s/req/g/export"
    assert request_topic("s", "g", "key.retire") == "cipherface/v1/s/req/g/retire"


def test_rotate_key_cli_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cipherface.agents import cli

    for var in ("CIPHERFACE_KEYS", "CIPHERFACE_SITE", "CIPHERFACE_GATEWAY"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["rotate-key"]) == 2
    assert "missing required --keys" in capsys.readouterr().err
    kdir = tmp_path / "k"
    sites.generate_key_dir(kdir, dim=DIM)
    (tmp_path / "file").write_text("x")
    phe = tmp_path / "phe"
    sites.generate_key_dir(phe, scheme="paillier", dim=DIM, security_level=112)
    base = ["rotate-key", "--broker", "mqtt://127.0.0.1:1", "--site", "s", "--gateway", "g"]
    cases = [
        ([*base, "--keys", str(tmp_path / "file")], "invalid_argument"),
        ([*base, "--keys", str(tmp_path / "none")], "invalid_argument"),
        ([*base, "--keys", str(kdir), "--page-packs", "0"], "invalid_argument"),
        ([*base, "--keys", str(kdir), "--page-packs", "129"], "invalid_argument"),
        ([*base, "--keys", str(phe)], "invalid_argument"),
        (["rotate-key", "--keys", str(kdir), "--site", "Bad Site", "--gateway", "g"], "invalid"),
    ]
    for argv, code in cases:
        assert cli.main(argv) == 3, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error [{code}"), (argv, err)
    assert not (tmp_path / "k.rotating").exists()  # nothing staged by a refused run


@pytest.mark.parametrize("atomic", [True, False])
def test_the_key_directory_switch_is_atomic_or_finished_after_a_crash(
    atomic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cipherface.agents import keyswap

    paths = keyswap.RotationPaths.of(tmp_path / "keys")
    for d, what in ((paths.keys, "old"), (paths.stage, "new")):
        d.mkdir()
        (d / "which").write_text(what)
    if not atomic:
        monkeypatch.setattr(keyswap, "_exchange", lambda a, b: False)
    keyswap.switch(paths)
    assert (paths.keys / "which").read_text() == "new" and not paths.swap.exists()
    assert (paths.stage / "which").read_text() == "old"
    # The fallback's three renames, cut after the first and after the second.
    for done in (1, 2):
        keyswap.switch(paths)  # back to old in DIR
        steps = [(paths.keys, paths.swap), (paths.stage, paths.keys)][:done]
        for src, dst in steps:
            src.rename(dst)
        keyswap.recover_switch(paths)
        assert (paths.keys / "which").read_text() == "new", done
        assert (paths.stage / "which").read_text() == "old" and not paths.swap.exists()


def test_a_first_format_key_rotates_into_packs_with_more_canaries(tmp_path: Path) -> None:
    """Old packs hold 31 people (1 canary), new ones 28 (4 canaries): a page's people no
    longer fit the payload they came from and go in several (payloads shrunk to 4 packs
    here so that a small gallery shows it)."""
    from cipherface.crypto.ckks import CkksKeys
    from cipherface.crypto.ckks_gallery import CkksGallery
    from cipherface.crypto.trust import TrustKey

    def key(canaries: int, name: str) -> tuple[CkksKeys, CkksEdgeCipher, Guard]:
        keys = CkksKeys.generate(dim=DIM)
        cipher = CkksEdgeCipher(keys=keys)
        # canaries=1: a first-format key (unbound packs); 4: a key made now.
        trust = TrustKey(seed=secrets.token_bytes(32), canaries=canaries, bound=canaries > 1)
        state = tmp_path / f"{name}.state"
        return keys, cipher, Guard(trust=trust, key_id=cipher.key_id, dim=DIM, state_path=state)

    okeys, ocipher, oguard = key(1, "old")
    nkeys, ncipher, nguard = key(4, "new")
    assert (oguard.canaries, nguard.canaries) == (1, 4)
    old = CkksGallery(path=tmp_path / "old", public=okeys.public)
    new = CkksGallery(path=tmp_path / "new", public=nkeys.public)
    names = [f"p{i}" for i in range(8 * 31)]
    labels, rows = oguard.with_canaries(names, unit(np.random.default_rng(2), len(names)))
    old.enroll(labels, ocipher.encrypt_templates(rows))
    ncipher.max_templates_per_payload = 4 * ncipher.per_pack  # 112 people a payload
    payloads: list[int] = []

    def enroll(labels: list[str], payload: bytes) -> None:
        payloads.append(len(labels))
        new.enroll(labels, payload)

    moved = rekey.rekey(
        source=lambda f, c: rekey.export_packs(old, f, c),
        old=(ocipher, oguard),
        new=(ncipher, nguard),
        enroll=enroll,
        progress=tmp_path / "progress",
        page_packs=8,
    )
    # 112, 112, 24 people + canaries (the last pack filled: 8 of them)
    assert moved == len(names) and payloads == [128, 128, 32]
    opened = nguard.open_slots(new.ids())
    assert sorted(x for x in opened if isinstance(x, str)) == sorted(names)
    old.close()
    new.close()
