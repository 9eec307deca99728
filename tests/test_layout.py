"""The design card's arrows, checked on the source: imports only run downwards.

``protocol`` is sans-IO (no sockets, no MQTT client, no crypto); ``crypto`` knows no MQTT
and nothing above it; ``faces`` knows no agents. Every package room is installed under
``cipherface.*`` (never a bare ``crypto`` or ``protocol`` in site-packages).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]

# room -> module prefixes it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "cipherface.protocol": (
        "cipherface.crypto",
        "cipherface.agents",
        "cipherface.faces",
        "socket",
        "ssl",
        "paho",
        "selectors",
        "asyncio",
        "threading",
    ),
    "cipherface.crypto": ("cipherface.agents", "cipherface.faces", "cipherface.compat", "paho"),
    "cipherface.faces": ("cipherface.agents", "paho"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _violations(room: str) -> list[str]:
    folder = ROOT / PACKAGE_DIR[room]
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[room]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_only_run_downwards(room: str) -> None:
    assert room in PACKAGE_DIR, f"{room} is not mapped in pyproject.toml"
    assert _violations(room) == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    # The checker itself must be able to fail: feed it a module that breaks the rule.
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom cipherface.agents.cli import main\n")
    found = _imports(bad)
    assert "socket" in found and "cipherface.agents.cli" in found


def test_every_room_installs_under_cipherface() -> None:
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert all(p == "cipherface" or p.startswith("cipherface.") for p in packages)
    assert set(PACKAGE_DIR) <= set(packages)
