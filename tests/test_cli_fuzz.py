"""Every CLI failure is one line and exit 3 (2 for usage), never a traceback.

A fuzz test over every input file the CLI reads (``.npy``, ``.npz``, key files,
PEM files, photos, folders) and the options that take values: each bad input
must end in ``error [code]: ...`` on one stderr line, exit 3, without numpy's
"allow_pickle" advice. Runs in-process (``cli.main``) against the session broker,
with no cloud agent: an input that wrongly passed every check would time out
after one second, which also exits 3, so each case also names the code it expects.
"""

from __future__ import annotations

import io
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cipherface.agents import cli

DIM = 128


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzzkeys") / "keys"
    assert cli.main(["keygen", "--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in list(os.environ):
        if var.startswith("CIPHERFACE_") and var != "CIPHERFACE_HOME":
            monkeypatch.delenv(var)
    yield


def _zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy(arr: Any, *, pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=pickle)
    return buf.getvalue()


#: Bad contents for a file that should be a numpy array or archive.
BAD_ARRAYS: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "random": lambda: secrets.token_bytes(300),
    "text": lambda: b"hello, world\n",
    "npy-header-only": lambda: _npy(np.ones(DIM))[:60],
    "truncated-npy": lambda: _npy(np.ones(DIM))[:-100],
    "pickled-objects": lambda: _npy(np.array([{"a": 1}], dtype=object), pickle=True),
    "pickle-stream": lambda: b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00]\x94.",
    "corrupt-zip": lambda: b"PK\x03\x04" + secrets.token_bytes(200),
    "zip-not-numpy": lambda: _zip_of({"ids.npy": b"nope", "embeddings.npy": b"nope"}),
    "strings": lambda: _npy(np.array(["a", "b"])),
    "wrong-dim": lambda: _npy(np.ones(DIM + 1)),
    "3-d": lambda: _npy(np.ones((2, 2, DIM))),
    "nan": lambda: _npy(np.full(DIM, np.nan)),
    "zeros": lambda: _npy(np.zeros(DIM)),
    "empty-array": lambda: _npy(np.zeros((0, DIM))),
    "complex": lambda: _npy(np.ones(DIM, dtype=complex)),
}


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


BAD_NPZ: dict[str, Callable[[], bytes]] = {
    **BAD_ARRAYS,
    "no-ids": lambda: _npz(embeddings=np.ones((2, DIM))),
    "numeric-ids": lambda: _npz(ids=np.arange(2), embeddings=np.ones((2, DIM))),
    "count-mismatch": lambda: _npz(ids=np.array(["a", "b"]), embeddings=np.ones((3, DIM))),
    "duplicate-ids": lambda: _npz(ids=np.array(["a", "a"]), embeddings=np.ones((2, DIM))),
    "bad-identity": lambda: _npz(ids=np.array(["a\nb", "c"]), embeddings=np.ones((2, DIM))),
    "string-embeddings": lambda: _npz(ids=np.array(["a"]), embeddings=np.array([["x"] * DIM])),
    "wrong-dim": lambda: _npz(ids=np.array(["a"]), embeddings=np.ones((1, DIM - 1))),
}

BAD_PEM: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "random": lambda: secrets.token_bytes(500),
    "truncated": lambda: b"-----BEGIN CERTIFICATE-----\nMIIB\n",
    "garbage-body": lambda: b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
}

BAD_KEYS: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "random": lambda: secrets.token_bytes(400),
    "header-only": lambda: b"CFKEY1\n",
    "header-garbage": lambda: b"CFKEY1\n" + secrets.token_bytes(100),
}


def _check(code: int, err: str, *, expect: int = 3) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expect, err
    assert "Traceback" not in err, err
    assert "allow_pickle" not in err, err
    if expect == 3:
        assert len(lines) == 1 and lines[0].startswith("error ["), err


def _edge_args(url: str, keys: Path) -> list[str]:
    return ["--broker", url, "--keys", str(keys), "--site", "fz", "--gateway", "g"]


def _tries(url: str) -> list[str]:
    return ["--timeout", "1", "--retries", "0"]


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
@pytest.mark.parametrize("command", ["verify", "identify", "enroll"])
def test_bad_embedding_file(
    case: str, command: str, broker: Any, keys: Path, tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "probe.npy"
    path.write_bytes(BAD_ARRAYS[case]())
    extra = ["--id", "alice"] if command in ("verify", "enroll") else []
    argv = [command, *_edge_args(broker.url, keys), *_tries(broker.url), *extra]
    code = cli.main([*argv, "--embedding", str(path)])
    _check(code, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("case", "says"),
    [("random", "is not a numpy file"), ("text", "is not a numpy file"),
     ("pickle-stream", "pickled Python objects"), ("pickled-objects", "pickled Python objects")],
)  # fmt: skip
def test_random_bytes_are_not_called_a_pickle(
    case: str, says: str, broker: Any, keys: Path, tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "probe.npy"
    path.write_bytes(BAD_ARRAYS[case]())
    argv = ["verify", *_edge_args(broker.url, keys), "--id", "a", "--embedding", str(path)]
    code = cli.main(argv)
    err = capsys.readouterr().err
    _check(code, err)
    assert says in err, err


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_bulk_file(case: str, broker: Any, keys: Path, tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "bulk.npz"
    path.write_bytes(BAD_NPZ[case]())
    argv = ["enroll", *_edge_args(broker.url, keys), *_tries(broker.url), "--no-progress"]
    code = cli.main([*argv, "--embeddings", str(path)])
    err = capsys.readouterr().err
    _check(code, err)
    assert "[timeout]" not in err and "[internal]" not in err, err


@pytest.mark.parametrize("case", sorted(BAD_PEM))
@pytest.mark.parametrize("option", ["--ca-file", "--cert"])
def test_bad_pem_files(case: str, option: str, keys: Path, tmp_path: Path, capsys: Any) -> None:
    pem = tmp_path / "x.pem"
    pem.write_bytes(BAD_PEM[case]())
    tls = ["--broker", "mqtts://127.0.0.1:9", "--keys", str(keys), "--site", "fz", "--gateway", "g"]
    extra = [option, str(pem)] + (["--key", str(pem)] if option == "--cert" else [])
    code = cli.main(["ids", *tls, *extra])
    err = capsys.readouterr().err
    _check(code, err)
    assert "[broker_tls]" in err, err


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_bad_key_files(case: str, broker: Any, tmp_path: Path, capsys: Any) -> None:
    kdir = tmp_path / "keys"
    kdir.mkdir()
    (kdir / "private.key").write_bytes(BAD_KEYS[case]())
    code = cli.main(["ids", *_edge_args(broker.url, kdir)])
    err = capsys.readouterr().err
    _check(code, err)
    assert "[key_file]" in err or "[storage_corrupt]" in err, err


@pytest.mark.parametrize("case", ["empty", "random", "text", "truncated-jpeg"])
def test_bad_photos(case: str, broker: Any, keys: Path, tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("deepface")
    data = {
        "empty": b"",
        "random": secrets.token_bytes(2000),
        "text": b"not an image",
        "truncated-jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + secrets.token_bytes(50),
    }[case]
    photo = tmp_path / "p.jpg"
    photo.write_bytes(data)
    code = cli.main(["identify", *_edge_args(broker.url, keys), *_tries(broker.url), str(photo)])
    _check(code, capsys.readouterr().err)


def test_odd_paths_and_values(broker: Any, keys: Path, tmp_path: Path, capsys: Any) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    probe = tmp_path / "v.npy"
    np.save(probe, np.ones(DIM))
    edge = [*_edge_args(broker.url, keys), *_tries(broker.url)]
    cases: list[tuple[list[str], int]] = [
        (["keygen", "--out", str(a_file)], 3),
        (["keygen", "--out", "/proc/forbidden/keys"], 3),
        (
            [
                "ids",
                "--broker",
                broker.url,
                "--keys",
                str(a_file),
                "--site",
                "fz",
                "--gateway",
                "g",
            ],
            3,
        ),
        (
            [
                "ids",
                "--broker",
                broker.url,
                "--keys",
                str(tmp_path / "none"),
                "--site",
                "s",
                "--gateway",
                "g",
            ],
            3,
        ),
        (
            [
                "ids",
                "--broker",
                broker.url,
                "--keys",
                str(keys),
                "--site",
                "Bad Site",
                "--gateway",
                "g",
            ],
            3,
        ),
        (["ids", "--broker", "http://x", "--keys", str(keys), "--site", "s", "--gateway", "g"], 3),
        (
            [
                "ids",
                "--broker",
                "mqtt://127.0.0.1:99999",
                "--keys",
                str(keys),
                "--site",
                "s",
                "--gateway",
                "g",
            ],
            3,
        ),
        (["ids", *edge, "--timeout", "-1"], 3),
        (["ids", *edge, "--retries", "-1"], 3),
        (["ids", *edge, "--timeout", "nan"], 3),
        (["enroll", *edge, "--photo-dir", str(a_file)], 3),
        (["enroll", *edge, "--photo-dir", str(tmp_path / "missing")], 3),
        (["enroll", *edge, "--id", "", "--embedding", str(probe)], 3),
        (["verify", *edge, "--id", "x" * 500, "--embedding", str(probe)], 3),
        (["cloud", "--broker", broker.url, "--data", str(a_file)], 3),
        (["cloud", "--broker", broker.url, "--data", "/proc/forbidden"], 3),
        (["edge", *edge, "--watch", str(a_file), "--max-photos", "1"], 3),
        (["ids", "--keys", str(keys), "--site", "s", "--gateway", "g", "--password", "x"], 3),
        (["ids", *edge, "--cert", str(a_file)], 3),
        (["ids", "--timeout", "x", *edge], 2),
    ]
    for argv, expect in cases:
        code = cli.main(argv)
        err = capsys.readouterr().err
        _check(code, err, expect=expect)
        assert "[internal]" not in err and "[timeout]" not in err, (argv, err)
