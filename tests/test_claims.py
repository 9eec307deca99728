"""Issue 8 item 5: inputs, secrets out of repr/errors, old formats, legacy schemes, lightphe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import msgpack
import numpy as np
import pytest

from cipherface.crypto import ckks, phe, sites
from cipherface.crypto.ckks import CkksEdgeCipher, CkksKeys
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.crypto.store import GalleryStore
from cipherface.errors import (
    DecodeError,
    InvalidArgumentError,
    KeyMismatchError,
    OutdatedFormatError,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def edge() -> CkksEdgeCipher:
    return CkksEdgeCipher(keys=CkksKeys.generate(dim=128))


# --------------------------------------------------------------------- inputs
def test_huge_entries_keep_their_direction(edge: CkksEdgeCipher, tmp_path: Path) -> None:
    """1e155 used to overflow the norm and encrypt as the zero vector (distance 1.0)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=128)
    gal = CkksGallery(path=tmp_path, public=edge.pub)
    gal.enroll(["a"], edge.encrypt_templates(x))
    for scale in (1e155, 1e300, 1e-300):
        s = edge.decrypt_scores(
            gal.verify("a", edge.encrypt_probe(x * scale, op="verify")), op="verify", count=1
        )[0]
        assert abs(s - 1.0) <= 1e-4, scale
    gal.close()


@pytest.mark.parametrize(
    "bad",
    [
        np.full(128, np.nan),
        np.full(128, np.inf),
        np.zeros(128),
        np.full(128, 5e-324),  # subnormal: no representable norm after scaling
        np.ones(128) * (1 + 1j),  # complex: would silently drop the imaginary part
        ["a"] * 128,
        np.ones(127),
    ],
    ids=["nan", "inf", "zero", "subnormal", "complex", "strings", "short"],
)
def test_bad_inputs_are_typed_errors(edge: CkksEdgeCipher, bad: object) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        edge.encrypt_probe(bad, op="verify")  # type: ignore[arg-type]
    assert err.value.code == "invalid_argument"
    with pytest.raises(InvalidArgumentError):
        edge.encrypt_templates(bad)  # type: ignore[arg-type]
    from cipherface.crypto.engine import normalise_embeddings  # the Paillier family's too

    with pytest.raises(InvalidArgumentError):
        normalise_embeddings(bad, 128)  # type: ignore[arg-type]


# ---------------------------------------------------------------- secrets
def test_secret_material_never_in_repr_or_errors(tmp_path: Path) -> None:
    keys = CkksKeys.generate(dim=128)
    secret = keys._secret
    assert secret is not None
    for obj in (keys, CkksEdgeCipher(keys=keys)):
        text = repr(obj) + str(obj)
        assert secret.hex()[:32] not in text and "secret_key" not in text
        assert keys.key_id in repr(obj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", phe.LegacySchemeWarning)
        for scheme in phe.SCHEMES:
            priv = phe.generate_private_key(scheme=scheme, bits=2048, dim=8)
            text = repr(priv) + str(priv) + repr(priv.public)
            for part in (priv.p, priv.q):
                assert str(int(part)) not in text and hex(int(part))[2:] not in text
    # An error about a private key file names the file, never its contents.
    sites.generate_key_dir(tmp_path / "k", dim=128)
    os.chmod(tmp_path / "k" / "private.key", 0o644)
    try:
        sites.load_edge_cipher(tmp_path / "k")
    except Exception as exc:
        raw = (tmp_path / "k" / "private.key").read_bytes()
        assert raw[-64:].hex() not in str(exc)
        assert "chmod 600" in str(exc)
    else:  # pragma: no cover
        pytest.fail("a world-readable private key loaded")


def test_cli_refuses_readable_key_unless_overridden(tmp_path: Path) -> None:
    sites.generate_key_dir(tmp_path / "k", dim=128)
    os.chmod(tmp_path / "k" / "private.key", 0o640)
    from cipherface.agents import cli

    args = cli.build_parser().parse_args(
        ["verify", "--keys", str(tmp_path / "k"), "--site", "s", "--gateway", "g", "--id", "x"]
    )
    assert args.allow_insecure_key_permissions is False
    from cipherface.errors import InsecurePermissionsError

    with pytest.raises(InsecurePermissionsError, match="allow-insecure-key-permissions"):
        cli._edge_client(args)
    args = cli.build_parser().parse_args(
        [
            "verify",
            "--keys",
            str(tmp_path / "k"),
            "--site",
            "s",
            "--gateway",
            "g",
            "--id",
            "x",
            "--allow-insecure-key-permissions",
        ]
    )
    with pytest.warns(UserWarning, match="chmod 600"):
        client = cli._edge_client(args)
    assert client is not None


# ---------------------------------------------------------------- old formats
def test_pre_seal_key_files_name_the_remedy(tmp_path: Path) -> None:
    """Key files written by the cf-ckks/1 engine (committed, made before this change)."""
    priv = tmp_path / "private.key"
    shutil.copy(DATA / "cf-ckks-1-private.key", priv)
    os.chmod(priv, 0o600)
    for path in (priv, DATA / "cf-ckks-1-public.key"):
        with pytest.raises(OutdatedFormatError, match="cipherface keygen") as err:
            CkksKeys.load(path)
        assert err.value.code == "outdated_format" and "re-enroll" in str(err.value)
    with pytest.raises(OutdatedFormatError):
        sites.load_edge_cipher(priv)
    with pytest.raises(KeyMismatchError, match="cipherface keygen"):  # received over MQTT
        sites.open_public((DATA / "cf-ckks-1-public.key").read_bytes())


def test_pre_seal_gallery_and_payloads_name_the_remedy(
    edge: CkksEdgeCipher, tmp_path: Path
) -> None:
    # A gallery directory as the cf-ckks/1 engine created it (its meta had no format).
    old = GalleryStore(
        tmp_path / "g",
        meta={"scheme": "ckks", "key_id": edge.key_id, "dim": 128, "params": {}},
    )
    old.close()
    with pytest.raises(OutdatedFormatError, match="re-enroll"):
        CkksGallery(path=tmp_path / "g", public=edge.pub)
    gal = CkksGallery(path=tmp_path / "new", public=edge.pub)
    payload = msgpack.unpackb(edge.encrypt_probe(np.ones(128), op="verify"))
    with pytest.raises(DecodeError, match="pre-SEAL"):
        gal.verify("x", msgpack.packb({**payload, "f": "cf-ckks/1"}))
    gal.close()
    assert ckks.FORMAT == "cf-ckks/2"


# ------------------------------------------------------------ legacy / extras
def test_okamoto_uchiyama_is_marked_legacy() -> None:
    assert "legacy" in (phe.__doc__ or "") and "chosen-ciphertext" in (phe.__doc__ or "")
    with pytest.warns(phe.LegacySchemeWarning, match="chosen ciphertext"):
        phe.generate_private_key(scheme=phe.OKAMOTO_UCHIYAMA, bits=2048, dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", phe.LegacySchemeWarning)
        phe.generate_private_key(scheme=phe.PAILLIER, bits=2048, dim=8)  # no warning


def test_lightphe_is_not_a_runtime_dependency() -> None:
    import tomllib

    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    deps = " ".join(cfg["project"]["dependencies"])
    assert "lightphe" not in deps
    assert any("lightphe" in d for d in cfg["project"]["optional-dependencies"]["dev"])
    # Importing everything the agents use never imports lightphe.
    code = (
        "import sys, cipherface, cipherface.compat, cipherface.compat_lite, "
        "cipherface.crypto.sites, cipherface.crypto.phe_gallery, cipherface.crypto.ckks_gallery, "
        "cipherface.agents.cli; print('lightphe' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
