"""Decoding untrusted msgpack with memory bounded by the expected shape.

Shared by every format that arrives from a peer or from disk: key files, CKKS and
Paillier-family payloads and results. (The protocol envelope has its own streaming
decoder in :mod:`cipherface.protocol.codec`.)
"""

from __future__ import annotations

from typing import Any

import msgpack


def unpack_bounded(
    data: bytes,
    *,
    max_containers: int,
    max_array_len: int,
    max_map_len: int = 16,
    max_str_len: int = 256,
) -> Any:
    """``msgpack.unpackb`` of untrusted bytes with memory bounded by the expected shape.

    msgpack turns one byte into an empty map or list (~60-70 bytes of Python objects), so
    limits on each container's length are not enough: a 4 MB array of empty maps, or
    maps nested in maps, cost ~70x their size. Here every container built is counted
    (``object_hook`` / ``list_hook``, called as each one completes) and decoding stops at
    ``max_containers``; with the per-container limits this caps the objects built at
    about ``max_containers * max(max_map_len, max_array_len)``. Extension types are
    refused; binaries can be as long as the data.

    Args:
        data: the bytes.
        max_containers: maps plus arrays the format can legitimately hold.
        max_array_len, max_map_len, max_str_len: per-object limits.

    Returns:
        The decoded object (maps with str/bytes keys).

    Raises:
        ValueError / TypeError (from msgpack) on anything malformed or over a limit.
    """
    built = 0

    def count(obj: Any) -> Any:
        nonlocal built
        built += 1
        if built > max_containers:
            raise ValueError(f"more than {max_containers} maps/arrays")
        return obj

    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        object_hook=count,
        list_hook=count,
        max_str_len=max_str_len,
        max_bin_len=len(data),
        max_array_len=max_array_len,
        max_map_len=max_map_len,
        max_ext_len=0,
    )
