"""Enrollment layouts: a folder per person, or Frigate's face library.

Frigate keeps its face library as ``<media>/clips/faces/<name>/*.jpg`` (and unsorted
recognition attempts in ``clips/faces/train/``, which are not a person). Point
:func:`library` at Frigate's media folder, its ``clips`` folder or the ``faces`` folder
itself; a plain ``DIR/<name>/*.jpg`` tree works the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from cipherface.errors import InvalidArgumentError

from .sources.folder import PHOTO_SUFFIXES

#: Folders of Frigate's face library that are not people.
NOT_PEOPLE: Final = frozenset({"train"})


def faces_root(path: str | os.PathLike[str]) -> Path:
    """The folder holding one sub-folder per person (Frigate's ``clips/faces``).

    Raises:
        InvalidArgumentError: not a folder.
    """
    root = Path(path)
    for candidate in (root / "clips" / "faces", root / "faces", root):
        if candidate.is_dir():
            return candidate
    raise InvalidArgumentError(f"{root} is not a folder")


def library(path: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """``{name: [photo, ...]}`` from a per-person folder tree or Frigate's face library.

    Raises:
        InvalidArgumentError: not a folder, or no photo in it.
    """
    root = faces_root(path)
    people: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name in NOT_PEOPLE or entry.name.startswith("."):
            continue
        photos = sorted(
            p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
        )
        if photos:
            people[entry.name] = photos
    if not people:
        raise InvalidArgumentError(f"no <name>/*.jpg folders in {root}")
    return people


def embed_library(
    edge: Any, people: dict[str, list[Path]], *, progress: bool = True
) -> tuple[list[str], Any, dict[str, str]]:
    """Embed a :func:`library`: one template per person (the mean of their photos).

    Photos without exactly one face are skipped and reported, never fatal.

    Returns:
        ``(ids, vectors, failures)`` as :meth:`EdgeClient.embed_folder` returns them.
    """
    ids, vectors, skipped = edge.embed_people(people, progress=progress)
    failures = {
        f"{who}/{photo.name}" if photo is not None else who: why
        for (who, photo), why in skipped.items()
    }
    return ids, vectors, failures


__all__ = ["NOT_PEOPLE", "embed_library", "faces_root", "library"]
