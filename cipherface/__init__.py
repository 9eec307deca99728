"""CipherFace over MQTT: privacy-preserving face verification for IoT.

``from cipherface import CipherFace, CipherFaceLite`` keeps the API of the
published ``cipherface`` package; the subpackages are

* :mod:`cipherface.crypto`   -- HE schemes, key files, the encrypted gallery engine;
* :mod:`cipherface.protocol` -- the sans-IO wire protocol (messages, codec, topics);
* :mod:`cipherface.agents`   -- MQTT edge and cloud agents, face embedding, the CLI.

The heavy classes load lazily so that ``import cipherface`` stays cheap on a
cloud host that has no face models installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cipherface import errors
from cipherface.errors import CipherFaceError, LocalError, RemoteError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cipherface.compat import CipherFace, CipherFaceLite


def __getattr__(name: str) -> Any:
    if name in ("CipherFace", "CipherFaceLite"):
        from cipherface import compat

        return getattr(compat, name)
    raise AttributeError(f"module 'cipherface' has no attribute {name!r}")


__all__ = [
    "CipherFace",
    "CipherFaceError",
    "CipherFaceLite",
    "LocalError",
    "RemoteError",
    "__version__",
    "errors",
]
