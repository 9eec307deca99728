"""Where the face tooling keeps things: the cache home, deepface's home and weights
folder, and the photos fetched by ``.ci/setup_data.sh``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cipherface.errors import (
    LocalError,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


ENV_HOME: Final = "CIPHERFACE_HOME"
ENV_DEEPFACE_HOME: Final = "CIPHERFACE_DEEPFACE_HOME"
SETUP_HINT: Final = "run .ci/setup_data.sh"


# ------------------------------------------------------------------------- folders
def cache_home() -> Path:
    """Return the project's cache root: ``$CIPHERFACE_HOME`` or ``~/.cache/cipherface``.

    Returns:
      Path: the folder (not created).
    """
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cipherface"


def deepface_home() -> Path:
    """Return the folder we give deepface as ``DEEPFACE_HOME``.

    ``$CIPHERFACE_DEEPFACE_HOME`` if set, else ``<cache_home()>/deepface``. deepface keeps
    its weights in ``<this>/.deepface/weights``.

    Returns:
      Path: the folder (not created).
    """
    env = os.environ.get(ENV_DEEPFACE_HOME)
    return Path(env).expanduser() if env else cache_home() / "deepface"


def weights_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """Return deepface's weights folder for a deepface home.

    Args:
      home (str | PathLike | None): a deepface home; None means :func:`deepface_home`.

    Returns:
      Path: ``<home>/.deepface/weights`` (not created).
    """
    base = Path(home).expanduser() if home is not None else deepface_home()
    return base / ".deepface" / "weights"


def photo_dir() -> Path:
    """Return the folder of face photos fetched by ``.ci/setup_data.sh``.

    Returns:
      Path: ``<cache_home()>/photos``.

    Raises:
      LocalError: if the folder does not exist or holds no photo; the message says to
        run ``.ci/setup_data.sh``.
    """
    folder = cache_home() / "photos"
    if not folder.is_dir() or not any(_photo_files(folder)):
        raise LocalError(
            f"no face photos in {folder}: {SETUP_HINT} (it fetches them from PyPI into "
            f"${ENV_HOME}/photos, default ~/.cache/cipherface/photos)"
        )
    return folder


def _photo_files(folder: Path) -> Iterable[Path]:
    return (p for p in sorted(folder.iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def find_photos(names: Iterable[str] | None = None) -> dict[str, Path]:
    """Locate the fetched face photos.

    Args:
      names (Iterable[str] | None): photo names to require, with or without extension
        (e.g. ``["obama", "biden.jpg"]``); None returns every photo.

    Returns:
      dict[str, Path]: photo stem (``"obama2"``) -> path.

    Raises:
      LocalError: if the photo folder is missing or a requested photo is not in it; the
        message says to run ``.ci/setup_data.sh``.
    """
    folder = photo_dir()
    found = {p.stem: p for p in _photo_files(folder)}
    if names is None:
        return found
    wanted = [Path(n).stem for n in names]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise LocalError(
            f"photo(s) {', '.join(missing)} not in {folder} (have: {', '.join(found)}): "
            f"{SETUP_HINT}"
        )
    return {n: found[n] for n in wanted}
