"""``cipherface gallery ...``: check, stats, export, import and compact galleries offline.

A gallery is named by ``--data DIR`` plus ``--site``/``--kid`` (every gallery under
DIR when omitted) and ``--store`` (as for ``cipherface cloud``), or directly by
``--location`` (a directory, ``sqlite:DIR``, or ``postgresql://...#site/kid``).
Stop the cloud agent first when the store is SQLite (one process per gallery).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cipherface.errors import InvalidArgumentError
from cipherface.store import gallery_location, split_location, store_exists
from cipherface.store.tools import check, compact, export_gallery, import_gallery, stats

EXIT_OK = 0
EXIT_DAMAGED = 1


def _galleries(args: argparse.Namespace) -> list[str]:
    if args.location:
        return [args.location]
    if not args.data:
        raise InvalidArgumentError("give --data DIR (and --site/--kid) or --location")
    root = Path(args.data)
    out = []
    for pub in sorted(root.glob("*/keys/*/public.key")):
        site, kid = pub.parent.parent.parent.name, pub.parent.name
        if (args.site in (None, site)) and (args.kid in (None, kid)):
            out.append(gallery_location(args.store, site, kid, root))
    return out


def _emit(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.json:
        print(json.dumps(rows if len(rows) != 1 else rows[0]))
        return
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))


def _cmd_check(args: argparse.Namespace) -> int:
    rows = [check(loc) for loc in _galleries(args)]
    _emit(args, rows)
    return EXIT_OK if all(r["ok"] for r in rows) else EXIT_DAMAGED


def _cmd_stats(args: argparse.Namespace) -> int:
    from cipherface.store import open_store

    rows = []
    for loc in _galleries(args):
        if not store_exists(loc):
            rows.append({"gallery": split_location(loc)[2], "missing": True})
            continue
        st = open_store(loc, verify=False)
        try:
            rows.append(stats(st))
        finally:
            st.close()
    _emit(args, rows)
    return EXIT_OK


def _cmd_compact(args: argparse.Namespace) -> int:
    _emit(args, [compact(loc, vacuum=args.vacuum) for loc in _galleries(args)])
    return EXIT_OK


def _one(args: argparse.Namespace) -> str:
    found = _galleries(args)
    if len(found) != 1:
        raise InvalidArgumentError(f"name exactly one gallery ({len(found)} match)")
    return found[0]


def _cmd_export(args: argparse.Namespace) -> int:
    _emit(args, [export_gallery(_one(args), args.out)])
    return EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    if args.location:
        loc = args.location
    else:
        if not (args.data and args.site and args.kid):
            raise InvalidArgumentError("import needs --location, or --data with --site and --kid")
        loc = gallery_location(args.store, args.site, args.kid, args.data)
    _emit(args, [import_gallery(args.file, loc)])
    return EXIT_OK


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gallery`` command group (each leaf sets ``func``, returning an exit code).

    Exit codes: 0 ok, 1 ``check`` found damage, 3 an error (as every command).
    """
    gal = subparsers.add_parser(
        "gallery",
        help="check, back up, restore and compact encrypted galleries (docs/storage.md)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = gal.add_subparsers(dest="gallery_command", required=True, metavar="COMMAND")

    def leaf(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data", default=os.environ.get("CIPHERFACE_DATA"), metavar="DIR")
        p.add_argument(
            "--store", default=os.environ.get("CIPHERFACE_STORE") or "sqlite:", metavar="URL"
        )
        p.add_argument("--site", default=None)
        p.add_argument("--kid", default=None, help="key id (default: every key of the site)")
        p.add_argument("--location", default=None, help="one gallery's location instead")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    leaf("check", "verify every row and block; exit 1 if any gallery is damaged", _cmd_check)
    leaf("stats", "live identities, dead slots awaiting erasure, blocks, bytes", _cmd_stats)
    p = leaf(
        "compact",
        "drop blocks with no live template; partly dead blocks need the edge",
        _cmd_compact,
    )
    p.add_argument(
        "--vacuum", action="store_true", help="also shrink the SQLite file (rewrites it)"
    )
    p = leaf(
        "export", "write a verified backup of one gallery (format: docs/storage.md)", _cmd_export
    )
    p.add_argument("--out", required=True, metavar="FILE")
    p = leaf("import", "restore one gallery from an export into an empty location", _cmd_import)
    p.add_argument("file", metavar="FILE")
    return gal
