"""The ``cipherface`` command line.

Commands (``cipherface COMMAND --help`` for each; docs/agents.md is the reference):

=============  ==============================================================
``keygen``     make a site's key pair (private.key 0600 + public.key)
``cloud``      run the cloud agent (encrypted galleries under ``--data``)
``enroll``     enroll one identity from photos, or many from an ``.npz``
``verify``     1:1 against a claimed identity
``identify``   1:N against the site's gallery
``delete``     erase identities
``ids``        list the enrolled identities
``edge``       camera gateway: ``--config FILE`` (Frigate, RTSP, MQTT, folders) or ``--watch DIR``
``events``     print the integrator events (JSON decisions) of a site as they happen
``guard``      forged results refused, decision budget, clear a halt
``rotate-key`` move the site to a new key pair, no re-capture (resumable)
``demo``       the whole system on this machine with real photos
``creds``      broker credentials: CA, certificates, accounts, ACL
``gallery``    check, stats, export/import, compact the cloud's galleries
=============  ==============================================================

Exit status: 0 for a successful command (a "no match" decision is a success),
2 for a usage error, 3 for any other failure (one line ``error [code]: message``,
the code of the :class:`~cipherface.errors.CipherFaceError`, ``io_error`` or
``internal``; never a traceback unless ``-vv``), 4 when ``cloud`` stood down because
another process took over its agent id (``session_taken_over``: a supervisor must
not restart it, or the two take the id from each other), 130 when interrupted.
Environment variables (:data:`cipherface.agents.deploy.ENV_VARS`) give the defaults
of ``--broker``, ``--username``, ``--password``, ``--ca-file``, ``--keys``,
``--data``, ``--site`` and ``--gateway``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from cipherface import __version__
from cipherface.agents.deploy import ENV_HELP, register_cli
from cipherface.agents.inputs import describe_failure, load_npy, load_npz
from cipherface.agents.mqtt import DEFAULT_BROKER, MQTT_VERSIONS, BrokerConfig
from cipherface.agents.quota import (
    IDENTIFY_PER_HOUR,
    VERIFY_PER_IDENTITY_PER_HOUR,
    WRITES_PER_HOUR,
)
from cipherface.errors import InvalidArgumentError, SessionTakenOverError
from cipherface.observe.logs import LOG_FORMATS, setup_logging
from cipherface.store.cli import register_cli as register_gallery_cli

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_ERROR: Final = 3
EXIT_REPLACED: Final = 4
EXIT_INTERRUPTED: Final = 130

Handler = Callable[[argparse.Namespace], int]


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


# ------------------------------------------------------------------ parser parts
def _broker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument(
        "--broker",
        default=_env("CIPHERFACE_BROKER"),
        metavar="URL",
        help=f"mqtt://host:port or mqtts://host:port (env CIPHERFACE_BROKER; "
        f"default {DEFAULT_BROKER})",
    )
    g.add_argument(
        "--username",
        default=_env("CIPHERFACE_USERNAME"),
        help="broker account (env CIPHERFACE_USERNAME)",
    )
    g.add_argument(
        "--password",
        default=_env("CIPHERFACE_PASSWORD"),
        help="its password; prefer env CIPHERFACE_PASSWORD (a command line shows in ps)",
    )
    g.add_argument(
        "--ca-file",
        default=_env("CIPHERFACE_CA"),
        metavar="PEM",
        help="CA certificate of the broker, for mqtts:// (env CIPHERFACE_CA; default: the "
        "system's trust store)",
    )
    g.add_argument("--cert", metavar="PEM", help="client certificate (mutual TLS)")
    g.add_argument("--key", metavar="PEM", help="client certificate's private key")
    g.add_argument(
        "--mqtt-version", choices=MQTT_VERSIONS, default="5", help="MQTT protocol (default 5)"
    )


def _edge_options(p: argparse.ArgumentParser) -> None:
    _broker_options(p)
    g = p.add_argument_group("edge")
    g.add_argument(
        "--keys",
        default=_env("CIPHERFACE_KEYS"),
        metavar="DIR",
        help="required: key directory made by keygen (or env CIPHERFACE_KEYS)",
    )
    g.add_argument(
        "--allow-insecure-key-permissions",
        action="store_true",
        help="load a private key that group/others can read (refused by default)",
    )
    g.add_argument(
        "--site", default=_env("CIPHERFACE_SITE"), help="required: site id (or env CIPHERFACE_SITE)"
    )
    g.add_argument(
        "--gateway",
        default=_env("CIPHERFACE_GATEWAY"),
        help="required: gateway id (or env CIPHERFACE_GATEWAY)",
    )
    g.add_argument("--timeout", type=float, default=15.0, help="seconds per attempt (default 15)")
    g.add_argument("--retries", type=int, default=2, help="extra attempts (default 2)")
    g.add_argument(
        "--decision-budget",
        type=int,
        default=int(_env("CIPHERFACE_DECISION_BUDGET") or 1_000_000),
        metavar="N",
        help="decisions one key may make before it must be rotated "
        "(env CIPHERFACE_DECISION_BUDGET; default 1000000)",
    )


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def build_parser() -> argparse.ArgumentParser:
    """The ``cipherface`` argument parser (every sub-command)."""
    parser = argparse.ArgumentParser(
        prog="cipherface",
        description="Privacy-preserving face verification over MQTT (homomorphic encryption).",
        epilog="Environment: " + "; ".join(f"{k}: {v}" for k, v in ENV_HELP.items()),
    )
    parser.add_argument("--version", action="version", version=f"cipherface {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: one line per request, -vv: debug)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=_env("CIPHERFACE_LOG_FORMAT") or "text",
        help="text (default) or json: one JSON object per line (env CIPHERFACE_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="create a site's key pair", description=_cmd_keygen.__doc__)
    p.add_argument(
        "--out",
        default=_env("CIPHERFACE_KEYS"),
        metavar="DIR",
        help="required: key directory to create (or env CIPHERFACE_KEYS)",
    )
    p.add_argument(
        "--scheme",
        default="ckks",
        choices=("ckks", "paillier", "damgard-jurik", "okamoto-uchiyama"),
        help="HE scheme (default ckks)",
    )
    p.add_argument("--model", default="Dlib", help="face model (default Dlib, 128-d)")
    p.add_argument("--metric", default="cosine", choices=("cosine", "euclidean"))
    p.add_argument("--security-level", type=int, default=128, choices=(112, 128, 192, 256))
    _json_option(p)
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("cloud", help="run the cloud agent", description=_cmd_cloud.__doc__)
    _broker_options(p)
    p.add_argument(
        "--data",
        default=_env("CIPHERFACE_DATA"),
        metavar="DIR",
        help="required: galleries directory (or env CIPHERFACE_DATA)",
    )
    p.add_argument(
        "--store",
        default=_env("CIPHERFACE_STORE") or "sqlite:",
        metavar="URL",
        help="gallery store: sqlite:[DIR] (default: SQLite under --data) or "
        "postgresql://USER@HOST/DB shared by several workers (env CIPHERFACE_STORE)",
    )
    p.add_argument(
        "--quota-identify",
        type=int,
        default=_env("CIPHERFACE_QUOTA_IDENTIFY") or str(IDENTIFY_PER_HOUR),
        metavar="N",
        help="identify requests each gateway may make an hour (0: no limit; "
        f"default {IDENTIFY_PER_HOUR}, env CIPHERFACE_QUOTA_IDENTIFY)",
    )
    p.add_argument(
        "--quota-verify",
        type=int,
        default=_env("CIPHERFACE_QUOTA_VERIFY") or str(VERIFY_PER_IDENTITY_PER_HOUR),
        metavar="N",
        help="verifies reading one pack (CKKS; one identity for the Paillier family) each "
        "gateway may make an hour (0: no limit; "
        f"default {VERIFY_PER_IDENTITY_PER_HOUR}, env CIPHERFACE_QUOTA_VERIFY)",
    )
    p.add_argument(
        "--quota-writes",
        type=int,
        default=_env("CIPHERFACE_QUOTA_WRITES") or str(WRITES_PER_HOUR),
        metavar="N",
        help="enroll/delete/key.retire requests each gateway may make an hour, each "
        f"storing its reply for a day (0: no limit; default {WRITES_PER_HOUR}, env "
        "CIPHERFACE_QUOTA_WRITES)",
    )
    p.add_argument(
        "--agent-id",
        default=None,
        help="client id / status id (default: the username, else cloud-local)",
    )
    p.add_argument(
        "--sites",
        action="append",
        default=[],
        help="serve only these sites (comma-separated, repeatable): one subscription each, "
        "as a cloud-<name> account's ACL requires",
    )
    p.add_argument("--no-share", action="store_true", help="plain subscription (no $share group)")
    _observe_options(p)
    p.add_argument(
        "--share-group",
        default="cipherface-cloud",
        metavar="NAME",
        help="shared-subscription group: workers of one group split the requests "
        "(default cipherface-cloud)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="most verifies scored in one engine call (default 32, or 8 with --workers; "
        "1 = no batching)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=0,
        metavar="N|auto",
        help="compute processes for verifies and identify probes (SEAL holds the GIL: one "
        "process uses one core); auto = one per core; 0 = in the agent's own process (default)",
    )
    p.add_argument(
        "--fast-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads serving verify and ids.get (default 2, or workers + 2)",
    )
    p.add_argument(
        "--serial",
        action="store_true",
        help="benchmarks: one worker thread, replies awaited inline (the agent before lanes)",
    )
    p.set_defaults(func=_cmd_cloud)

    p = sub.add_parser("enroll", help="enroll identities", description=_cmd_enroll.__doc__)
    _edge_options(p)
    p.add_argument("--id", dest="identity", metavar="NAME", help="identity to enroll")
    p.add_argument("photos", nargs="*", metavar="PHOTO", help="photos of NAME (averaged)")
    p.add_argument("--embedding", metavar="FILE.npy", help="NAME's embedding(s), instead of photos")
    p.add_argument(
        "--embeddings",
        metavar="FILE.npz",
        help="bulk: arrays 'ids' (n strings) and 'embeddings' (n x d)",
    )
    p.add_argument(
        "--photo-dir",
        metavar="DIR",
        help="bulk from photos: DIR/<identity>/*.jpg (averaged) or DIR/<identity>.jpg",
    )
    p.add_argument(
        "--frigate-faces",
        metavar="DIR",
        help="bulk from Frigate's face library: DIR/clips/faces/<name>/*.jpg ('train' skipped)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _json_option(p)
    p.set_defaults(func=_cmd_enroll)

    p = sub.add_parser("verify", help="1:1 verification", description=_cmd_verify.__doc__)
    _edge_options(p)
    p.add_argument("--id", dest="identity", metavar="NAME", required=True, help="claimed identity")
    p.add_argument("photo", nargs="?", metavar="PHOTO")
    p.add_argument("--embedding", metavar="FILE.npy", help="probe embedding instead of a photo")
    _json_option(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("identify", help="1:N identification", description=_cmd_identify.__doc__)
    _edge_options(p)
    p.add_argument("photo", nargs="?", metavar="PHOTO")
    p.add_argument("--embedding", metavar="FILE.npy", help="probe embedding instead of a photo")
    _json_option(p)
    p.set_defaults(func=_cmd_identify)

    p = sub.add_parser("delete", help="erase identities", description=_cmd_delete.__doc__)
    _edge_options(p)
    p.add_argument(
        "--id", dest="ids", metavar="NAME", action="append", required=True, help="repeatable"
    )
    p.add_argument(
        "--all-keys", action="store_true", help="also from galleries of the site's older keys"
    )
    _json_option(p)
    p.set_defaults(func=_cmd_delete)

    p = sub.add_parser("ids", help="list enrolled identities", description=_cmd_ids.__doc__)
    _edge_options(p)
    _json_option(p)
    p.set_defaults(func=_cmd_ids)

    p = sub.add_parser("edge", help="camera gateway daemon", description=_cmd_edge.__doc__)
    _edge_options(p)
    p.add_argument("--config", metavar="FILE", help="gateway config (TOML: docs/integrations.md)")
    p.add_argument("--watch", metavar="DIR", help="folder of incoming photos (without --config)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between scans (default 0.5)")
    p.add_argument("--max-photos", type=int, default=None, help="exit after this many outcomes")
    _observe_options(p)
    p.set_defaults(func=_cmd_edge)

    p = sub.add_parser(
        "guard", help="forged results, decision budget", description=_cmd_guard.__doc__
    )
    p.add_argument(
        "--keys",
        default=_env("CIPHERFACE_KEYS"),
        metavar="DIR",
        help="key directory (env CIPHERFACE_KEYS)",
    )
    p.add_argument("--reset", action="store_true", help="clear a halt after investigating")
    _json_option(p)
    p.set_defaults(func=_cmd_guard)

    p = sub.add_parser(
        "rotate-key",
        help="move the site to a new key pair without re-capturing a face",
        description=_cmd_rotate_key.__doc__,
    )
    _edge_options(p)
    p.add_argument(
        "--page-packs",
        type=int,
        default=_int_env("CIPHERFACE_ROTATE_PAGE_PACKS") or 32,
        metavar="N",
        help="packs of the old gallery per page, 1..128 (32 slots each, canaries included; "
        "env CIPHERFACE_ROTATE_PAGE_PACKS; default 32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    _json_option(p)
    p.set_defaults(func=_cmd_rotate_key)

    p = sub.add_parser("events", help="print integrator events", description=_cmd_events.__doc__)
    _broker_options(p)
    p.add_argument("--site", default=_env("CIPHERFACE_SITE"), help="site id (default: all)")
    p.add_argument("--person", metavar="NAME", help="only the matches of this person")
    p.add_argument("--count", type=int, default=None, help="exit after this many events")
    _json_option(p)
    p.set_defaults(func=_cmd_events)

    p = sub.add_parser("demo", help="run everything locally", description=_cmd_demo.__doc__)
    p.add_argument(
        "--broker",
        default=None,
        metavar="URL",
        help="use this broker instead of starting a local Mosquitto",
    )
    p.add_argument("--keep", metavar="DIR", default=None, help="keep keys and galleries in DIR")
    _json_option(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("health", help="probe a running agent", description=_cmd_health.__doc__)
    p.add_argument(
        "--url",
        default="http://127.0.0.1:9464/healthz",
        help="the agent's health URL or host:port (default http://127.0.0.1:9464/healthz)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing when healthy")
    _json_option(p)
    p.set_defaults(func=_cmd_health)

    register_cli(sub)
    register_gallery_cli(sub)
    return parser


def _observe_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("operations (docs/operations.md)")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=_int_env("CIPHERFACE_METRICS_PORT"),
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this port (env CIPHERFACE_METRICS_PORT; "
        "default: off; 9464 is customary)",
    )
    g.add_argument(
        "--metrics-host",
        default=_env("CIPHERFACE_METRICS_HOST") or "127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default 127.0.0.1; 0.0.0.0 for a remote scraper)",
    )
    g.add_argument(
        "--health-interval",
        type=float,
        default=30.0,
        metavar="SEC",
        help="seconds between the retained JSON health messages (default 30)",
    )


def _int_env(name: str) -> int | None:
    value = _env(name)
    return int(value) if value is not None and value.isdigit() else None


# ---------------------------------------------------------------------- helpers
#: The environment variable that stands in for each required option.
_ENV_OF: Final = {
    "keys": "CIPHERFACE_KEYS",
    "out": "CIPHERFACE_KEYS",
    "site": "CIPHERFACE_SITE",
    "gateway": "CIPHERFACE_GATEWAY",
    "data": "CIPHERFACE_DATA",
}


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        what = ", ".join(
            f"--{n.replace('_', '-')} (or env {_ENV_OF[n]})" if n in _ENV_OF else f"--{n}"
            for n in missing
        )
        raise _Usage(f"missing required {what}")


class _Usage(Exception):
    """A usage error found after parsing (exit status 2)."""


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    """The :class:`BrokerConfig` the common options describe."""
    return BrokerConfig(
        url=args.broker or DEFAULT_BROKER,
        username=args.username,
        password=args.password,
        ca_file=args.ca_file,
        cert_file=args.cert,
        key_file=args.key,
        mqtt_version=args.mqtt_version,
    )


def _edge_client(args: argparse.Namespace, **kwargs: Any) -> Any:
    from cipherface.agents.edge import EdgeClient
    from cipherface.crypto.guard import load_guard
    from cipherface.crypto.sites import load_edge_cipher
    from cipherface.observe.logs import log_request

    _require(args, "keys", "site", "gateway")
    cipher = load_edge_cipher(
        args.keys,
        allow_insecure_permissions=getattr(args, "allow_insecure_key_permissions", False),
    )
    guard = load_guard(args.keys, cipher, budget=args.decision_budget)
    if guard is None:
        logging.getLogger("cipherface").warning(
            "%s has no trust.key (made before cipherface 0.2): results are not checked "
            "against canaries and names travel in clear; move to a new key "
            "(docs/deployment.md, section 5)",
            args.keys,
        )
    edge = EdgeClient(
        broker=broker_config(args),
        cipher=cipher,
        guard=guard,
        site=args.site,
        gateway=args.gateway,
        timeout=args.timeout,
        retries=args.retries,
        **kwargs,
    )
    # -v: one line per request, like the cloud's (the daemon's metrics replace this hook).
    edge.on_request = lambda op, outcome, seconds: log_request(
        role="edge", op=op, site=args.site, gateway=args.gateway, outcome=outcome, seconds=seconds
    )
    return edge


def _load_npy(path: str) -> np.ndarray[Any, Any]:
    return load_npy(path)


def _probe(args: argparse.Namespace) -> tuple[Any, np.ndarray[Any, Any] | None]:
    if (args.photo is None) == (args.embedding is None):
        raise _Usage("give a PHOTO or --embedding FILE.npy (exactly one)")
    if args.embedding is not None:
        return None, _load_npy(args.embedding)
    return args.photo, None


def _print_decision(args: argparse.Namespace, decision: Any) -> None:
    from cipherface.agents.edge import decision_json

    if args.json:
        print(json.dumps(decision_json(decision)), flush=True)
        return
    verdict = "MATCH" if decision.match else "no match"
    who = decision.identity if decision.identity is not None else "nobody"
    what = f"{decision.op} {who}" if decision.op == "verify" else f"identify -> {who}"
    print(f"{what}: {verdict} ({decision.latency_ms:.1f} ms)", flush=True)


# --------------------------------------------------------------------- commands
def _cmd_keygen(args: argparse.Namespace) -> int:
    """Create a key pair in --out DIR: private.key (0600, stays on the edge) and
    public.key (what the cloud receives)."""
    from cipherface.crypto import sites, thresholds

    _require(args, "out")
    dim = thresholds.dim(args.model)
    kid = sites.generate_key_dir(
        args.out,
        scheme=args.scheme,
        dim=dim,
        model=args.model,
        metric=args.metric,
        security_level=args.security_level,
    )
    info = {
        "key_id": kid,
        "scheme": args.scheme,
        "model": args.model,
        "metric": args.metric,
        "dim": dim,
        "security_level": args.security_level,
        "dir": str(Path(args.out)),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"key {kid} ({args.scheme}, {args.model} {dim}-d, {args.metric}) in {args.out}")
    return EXIT_OK


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _workers(value: str) -> int:
    """``--workers``: a count, or ``auto`` (one per core, none on a single core)."""
    if value == "auto":
        cores = os.cpu_count() or 1
        return cores if cores > 1 else 0
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or 'auto': {value!r}") from None
    if not 0 <= n <= 256:
        raise argparse.ArgumentTypeError(f"between 0 and 256: {n}")
    return n


def _cmd_cloud(args: argparse.Namespace) -> int:
    """Run the cloud agent until SIGINT/SIGTERM: it stores each site's encrypted
    gallery under --data and answers the edges' requests."""
    from cipherface.agents.cloud import DEFAULT_AGENT_ID, CloudAgent
    from cipherface.agents.quota import QuotaPolicy

    _require(args, "data")
    if os.path.exists(args.data) and not os.path.isdir(args.data):
        raise InvalidArgumentError(f"--data {args.data} is not a directory")
    sites = [s.strip() for v in args.sites for s in v.split(",") if s.strip()] or None
    agent_id = args.agent_id or args.username or DEFAULT_AGENT_ID
    agent = CloudAgent(
        broker=broker_config(args),
        data_dir=args.data,
        agent_id=agent_id,
        sites=sites,
        share_group=None if args.no_share else args.share_group,
        store=args.store,
        quotas=QuotaPolicy(
            identify_per_hour=args.quota_identify,
            verify_per_identity_per_hour=args.quota_verify,
            writes_per_hour=args.quota_writes,
        ),
        max_batch=args.max_batch,
        fast_threads=args.fast_threads,
        workers=args.workers,
        serial=args.serial,
    )
    from cipherface.agents.observed import cloud_health, observe_cloud

    stop = _stop_on_signals()
    agent.on_taken_over = stop.set
    observed = observe_cloud(agent, port=args.metrics_port, host=args.metrics_host)
    try:
        agent.start()
        observed.start_health(cloud_health(agent, interval=args.health_interval))
        print(
            f"cloud agent {agent_id} serving {', '.join(agent.filters())} on "
            f"{agent.broker.url} (data: {args.data}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    finally:
        observed.stop()
        agent.stop()
    if agent.taken_over.is_set():
        print(
            f"error [{SessionTakenOverError.code}]: another process connected as {agent_id} and "
            "took over its broker session; this worker stood down (exit status 4: do not "
            "restart it while the other one runs, give each worker its own --agent-id)",
            file=sys.stderr,
        )
        return EXIT_REPLACED
    return EXIT_OK


def _cmd_enroll(args: argparse.Namespace) -> int:
    """Enroll one identity (--id NAME with photos, or with --embedding FILE.npy) or many
    (--embeddings FILE.npz with arrays 'ids' and 'embeddings', --photo-dir DIR of
    DIR/<identity>/*.jpg or DIR/<identity>.jpg, or --frigate-faces DIR: Frigate's face
    library, DIR/clips/faces/<name>/*.jpg). Publishes the site's public key first
    (idempotent)."""
    bulk = args.embeddings is not None
    frigate = args.frigate_faces is not None
    folder = args.photo_dir is not None or frigate
    single = args.identity is not None
    if bulk + folder + single != 1 or (frigate and args.photo_dir is not None):
        raise _Usage(
            "give --id NAME (with PHOTOs or --embedding), --embeddings FILE.npz, "
            "--photo-dir DIR or --frigate-faces DIR"
        )
    if single and bool(args.photos) == (args.embedding is not None):
        raise _Usage("with --id, give PHOTO(s) or --embedding FILE.npy (exactly one)")
    if (bulk or folder) and (args.photos or args.embedding):
        raise _Usage("--embeddings and --photo-dir take no PHOTO or --embedding")
    committed: list[str] = []

    def note(chunk_ids: Sequence[str], stored: int) -> None:
        committed.extend(chunk_ids)

    with _edge_client(args, publish_decisions=False) as edge:
        if frigate:
            from cipherface.cameras.enroll import embed_library, library

            ids, vectors, failures = embed_library(
                edge, library(args.frigate_faces), progress=not args.no_progress
            )
        elif folder:
            ids, vectors, failures = edge.embed_folder(
                args.photo_dir, progress=not args.no_progress
            )
            for photo, why in failures.items():
                print(f"skipped {photo}: {why}", file=sys.stderr)
            stored = _bulk(edge, ids, vectors, args, committed, note) if ids else 0
            out = {
                "enrolled": stored,
                "identities": len(ids),
                "skipped": len(failures),
                "site": args.site,
            }
        elif bulk:
            ids, vectors = load_npz(args.embeddings)
            stored = _bulk(edge, ids, vectors, args, committed, note)
            out = {"enrolled": stored, "identities": len(ids), "site": args.site}
        else:
            if args.embedding is not None:
                result = edge.enroll(args.identity, embeddings=_load_npy(args.embedding))
            else:
                result = edge.enroll(args.identity, args.photos)
            stored = result.enrolled or 0
            out = {"enrolled": stored, "identity": args.identity, "site": args.site}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"enrolled {stored} template(s) at site {args.site}")
    return EXIT_OK


def _bulk(
    edge: Any,
    ids: list[str],
    vectors: Any,
    args: argparse.Namespace,
    committed: list[str],
    note: Callable[[Sequence[str], int], None],
) -> int:
    """``edge.enroll_bulk``; on Ctrl-C, say which identities the cloud confirmed."""
    try:
        return int(edge.enroll_bulk(ids, vectors, progress=not args.no_progress, on_chunk=note))
    except KeyboardInterrupt:
        span = f" ({committed[0]} .. {committed[-1]})" if committed else ""
        print(
            f"\ninterrupted: the cloud confirmed {len(committed)} of {len(ids)} "
            f"identities{span}; the chunk in flight may or may not be stored. Enrolling "
            "is idempotent: run the same command again to finish.",
            file=sys.stderr,
            flush=True,
        )
        raise


def _cmd_verify(args: argparse.Namespace) -> int:
    """1:1: is the person in PHOTO (or --embedding) the identity --id NAME?"""
    photo, vector = _probe(args)
    with _edge_client(args) as edge:
        decision = edge.verify(args.identity, photo, vector=vector)
    _print_decision(args, decision)
    return EXIT_OK


def _cmd_identify(args: argparse.Namespace) -> int:
    """1:N: who, among the site's enrolled identities, is in PHOTO (or --embedding)?"""
    photo, vector = _probe(args)
    with _edge_client(args) as edge:
        decision = edge.identify(photo, vector=vector)
    _print_decision(args, decision)
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace) -> int:
    """Erase identities from the site's encrypted gallery."""
    with _edge_client(args, publish_decisions=False) as edge:
        deleted = edge.delete(args.ids, all_keys=args.all_keys)
    if args.json:
        print(json.dumps({"deleted": deleted, "ids": args.ids, "site": args.site}))
    else:
        print(f"deleted {deleted} of {len(args.ids)} identit{'y' if len(args.ids) == 1 else 'ies'}")
    return EXIT_OK


def _cmd_ids(args: argparse.Namespace) -> int:
    """List the identities enrolled under this key at this site."""
    with _edge_client(args, publish_decisions=False) as edge:
        ids = sorted({i for i in edge.ids() if i is not None})
    if args.json:
        print(json.dumps({"ids": ids, "count": len(ids), "site": args.site}))
    else:
        for name in ids:
            print(name)
    return EXIT_OK


def _cmd_guard(args: argparse.Namespace) -> int:
    """Show the key's guard state: decisions made, forged results refused, halt (and
    clear the halt with --reset)."""
    from dataclasses import asdict

    from cipherface.crypto.guard import load_guard
    from cipherface.crypto.sites import load_edge_cipher

    _require(args, "keys")
    guard = load_guard(args.keys, load_edge_cipher(args.keys))
    if guard is None:
        raise InvalidArgumentError(f"{args.keys} has no trust.key: an unguarded key (rotate it)")
    if args.reset:
        guard.reset_halt()
    info = {**asdict(guard.status()), "budget": guard.budget}
    if args.json:
        print(json.dumps(info))
    else:
        halted = f"HALTED ({info['halted']})" if info["halted"] else "running"
        print(
            f"key {info['key_id']}: {halted}; {info['decisions']} of {info['budget']} "
            f"decisions, {info['forged']} forged result(s) refused"
        )
    return EXIT_OK


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    """Move the site to a new key pair without re-capturing a face: a new key and
    trust.key are made beside --keys DIR (DIR.rotating), the gallery is streamed back
    from the cloud page by page, decrypted (canaries checked) and enrolled under the new
    key, then DIR switches to the new key atomically, the cloud destroys the old gallery
    and the old private key is shredded. The old gallery serves until the switch.
    Interrupted (even kill -9)? Run the same command again: it resumes."""
    from cipherface.agents.rotate import RotationStatus, rotate_key

    _require(args, "keys", "site", "gateway")

    def show(st: RotationStatus) -> None:
        if st.phase == "copy":
            done, total = st.pages
            text = f"page {done}/{total} ({st.packs_done}/{st.packs_total} packs)"
            print(f"rotate-key: {text}, {st.moved} identities moved", file=sys.stderr, flush=True)
        elif st.phase == "switched":
            print(f"rotate-key: {args.keys} now holds key {st.new}", file=sys.stderr, flush=True)
        elif st.phase == "retired":
            print(f"rotate-key: key {st.old} retired at the cloud", file=sys.stderr, flush=True)

    try:
        report = rotate_key(
            broker=broker_config(args),
            keys=args.keys,
            site=args.site,
            gateway=args.gateway,
            page_packs=args.page_packs,
            timeout=args.timeout,
            retries=args.retries,
            allow_insecure_permissions=args.allow_insecure_key_permissions,
            on_progress=None if args.no_progress else show,
        )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: run the same command again to resume the rotation",
            file=sys.stderr,
            flush=True,
        )
        raise
    out = {
        "old_key": report.old,
        "new_key": report.new,
        "moved": report.moved,
        "resumed": report.resumed,
        "site": args.site,
        "keys": str(args.keys),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"site {args.site}: key {report.old} -> {report.new}, {report.moved} identities "
            f"moved; the old gallery and private key are destroyed (restart the gateways "
            f"that use {args.keys})"
        )
    return EXIT_OK


def _cmd_edge(args: argparse.Namespace) -> int:
    """Camera gateway: with --config FILE, the cameras, Frigate, thresholds and outputs it
    lists (docs/integrations.md); with --watch DIR, identify every photo that appears in
    DIR and move it to DIR/done/ (or DIR/failed/). Each outcome is published as integrator
    JSON and printed as a JSON line. Runs until SIGINT/SIGTERM (or --max-photos)."""
    from cipherface.cameras import cli as cameras

    if bool(args.config) == bool(args.watch):
        raise _Usage("give --config FILE or --watch DIR (exactly one)")
    if args.watch and os.path.exists(args.watch) and not os.path.isdir(args.watch):
        raise InvalidArgumentError(f"--watch {args.watch} is not a directory")
    stop = _stop_on_signals()
    unknown = None
    if args.config:
        from cipherface.agents.edge import EdgeClient
        from cipherface.cameras.config import load
        from cipherface.crypto.sites import load_edge_cipher

        cfg = load(args.config)
        sources, outputs = cfg.sources(), cfg.outputs()
        policies, default = dict(cfg.cameras), cfg.defaults
        unknown = cfg.unknown_faces()
        if args.max_photos is not None:
            outputs.append(cameras.PrintOutput(limit=args.max_photos, stop=stop))
        client_id = f"{cfg.site}.{cfg.gateway}"
        from cipherface.crypto.guard import load_guard

        cipher = load_edge_cipher(cfg.keys)
        edge = EdgeClient(
            broker=cfg.cloud,
            cipher=cipher,
            guard=load_guard(cfg.keys, cipher, budget=args.decision_budget),
            site=cfg.site,
            gateway=cfg.gateway,
            timeout=args.timeout,
            retries=args.retries,
            announce=True,
            persistent=True,
            client_id=client_id,
        )
        mqtt = cfg.mqtt
    else:
        sources, outputs, default = cameras.watch_setup(
            args.watch, poll=args.poll, max_photos=args.max_photos, stop=stop
        )
        policies = {}
        # A stable client id and a persistent session: results published while the
        # daemon reconnects are queued for it.
        watch_id = f"{args.site}.{args.gateway}" if args.site and args.gateway else None
        edge = _edge_client(args, announce=True, persistent=True, client_id=watch_id)
        mqtt = broker_config(args)
    from cipherface.agents.observed import edge_health, observe_edge

    with edge:
        observed, counter = observe_edge(edge, port=args.metrics_port, host=args.metrics_host)
        outputs.append(counter)
        try:
            observed.start_health(edge_health(edge, observed, interval=args.health_interval))
            edge.embedder.warmup()  # pay the model load (and see missing weights) now
            edge.ensure_key()
            cameras.run_gateway(
                edge=edge,
                mqtt=mqtt,
                sources=sources,
                outputs=outputs,
                policies=policies,
                default_policy=default,
                stop=stop,
                unknown_faces=unknown,
                announce=lambda what: print(
                    f"gateway {edge.site}/{edge.gateway}: {what}; Ctrl-C to stop",
                    file=sys.stderr,
                    flush=True,
                ),
            )
        finally:
            observed.stop()
    return EXIT_OK


def _cmd_health(args: argparse.Namespace) -> int:
    """Probe a running agent's /healthz (its --metrics-port): exit 0 when it is
    connected to the broker, 3 otherwise (for container healthchecks and systemd)."""
    from cipherface.observe.health import probe

    doc = probe(args.url, timeout=args.timeout)
    if not args.quiet:
        print(json.dumps(doc) if args.json else f"{doc.get('role')} {doc.get('agent')}: ok")
    return EXIT_OK


def _cmd_events(args: argparse.Namespace) -> int:
    """Print the integrator events (decisions, unknown faces, stale captures, errors) of
    --site (or of every site the account may read) as they happen: one line each, or
    their JSON with --json (docs/integrations.md)."""
    from cipherface.cameras.cli import stream_events

    stream_events(
        broker=broker_config(args),
        site=args.site,
        person=args.person,
        as_json=args.json,
        count=args.count,
        stop=_stop_on_signals(),
    )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    """Start a local broker, a cloud agent and an edge agent, enroll people from real
    photos, then verify and identify probes, printing each decision and its latency."""
    from cipherface.agents.demo import run_demo

    return run_demo(broker_url=args.broker, keep=args.keep, as_json=args.json)


# ------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cipherface`` console script.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging(args.verbose, args.log_format)
    func: Handler = args.func
    try:
        return int(func(args))
    except _Usage as exc:
        parser.print_usage(sys.stderr)
        print(f"cipherface {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, whatever failed (a traceback only at -vv)
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        code, text = describe_failure(exc)
        print(f"error [{code}]: {text}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
