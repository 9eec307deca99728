"""What crosses the network: a full CKKS session captured byte for byte.

Edge and cloud talk to a real Mosquitto through a recording TCP proxy; the capture of
an enroll / verify / identify / delete session must contain no secret-key bytes, no
private-key-file bytes and no plaintext embedding in any encoding we could leak it in.
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgpack
import numpy as np
import pytest

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.edge import EdgeClient
from cipherface.agents.mqtt import BrokerConfig
from cipherface.crypto import sites
from cipherface.crypto.ckks import CkksEdgeCipher


class RecordingProxy:
    """Forwards TCP connections to ``target`` and keeps every byte in both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.chunks.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def captured(self) -> bytes:
        with self._lock:
            return b"".join(self.chunks)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def proxy(broker: Any) -> Iterator[RecordingProxy]:
    u = urlparse(broker.url)
    p = RecordingProxy((u.hostname or "127.0.0.1", u.port or 1883))
    yield p
    p.close()


def _windows(data: bytes, size: int, step: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, max(1, len(data) - size + 1), step)]


def test_session_capture_holds_no_secret_and_no_embedding(
    proxy: RecordingProxy, tmp_path: Path
) -> None:
    site = f"cap{secrets.token_hex(3)}"
    sites.generate_key_dir(tmp_path / "keys", dim=128)
    cipher = sites.load_edge_cipher(tmp_path / "keys")
    assert isinstance(cipher, CkksEdgeCipher) and cipher.keys.has_secret
    url = f"mqtt://127.0.0.1:{proxy.port}"
    rng = np.random.default_rng(secrets.randbits(32))
    people = rng.normal(size=(3, 128))
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    probe = people[1] + 0.01 * rng.normal(size=128)
    probe /= np.linalg.norm(probe)

    cloud = CloudAgent(
        broker=BrokerConfig(url=url),
        data_dir=tmp_path / "cloud",
        agent_id=f"cloud-{secrets.token_hex(3)}",
        sites=[site],
        share_group=f"g{secrets.token_hex(3)}",
    )
    cloud.start()
    try:
        with EdgeClient(
            broker=BrokerConfig(url=url), cipher=cipher, site=site, gateway="gw1"
        ) as edge:
            for name, v in zip(("alice", "bob", "carol"), people):
                edge.enroll(name, embeddings=v)
            assert edge.verify("bob", vector=probe).match is True
            d = edge.identify(vector=probe)
            assert d.match is True and d.identity == "bob"
            edge.delete(["carol"])
    finally:
        cloud.stop(retire=True)
    wire = proxy.captured()
    assert len(wire) > 4_000_000  # the session really went through the proxy (probes are MBs)

    # 1. No secret-key material: SEAL's secret key as stored (zstd) and its raw residues,
    #    in any 32-byte window, and no 64-byte window of the private key file.
    from cipherface.crypto import seal

    stored = cipher.keys._secret
    assert stored is not None
    # (the raw residues start after parms_id, count, scale and the array's header: 72 bytes;
    # parms_id itself is public, the public key carries it too)
    for secret in (stored[16:], seal.unwrap(stored, "secret key", 1 << 20)[72:]):
        for w in _windows(secret, 32, 32):
            assert w not in wire
    private_file = (tmp_path / "keys" / "private.key").read_bytes()
    public_file = (tmp_path / "keys" / "public.key").read_bytes()
    assert public_file[-64:] in wire  # the public key does travel (control)
    for w in _windows(private_file, 64, 64):
        if w not in public_file:  # what private and public files share is public
            assert w not in wire

    # 2. No plaintext embedding, whether as float64/float32, as the engine's fixed-point
    #    integers, or msgpack-encoded floats.
    for v in (*people, probe):
        fixed = np.rint(v * 2**29).astype(np.int64)
        encodings = [
            v.tobytes()[:64],
            v.astype(np.float32).tobytes()[:32],
            fixed.tobytes()[:64],
            fixed.astype("<i4").tobytes()[:32],
            b"".join(msgpack.packb(float(x)) for x in v[:6]),
        ]
        for enc in encodings:
            assert enc not in wire
