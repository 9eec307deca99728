"""What the pytest plugin's fixtures cost: broker, cloud, keys, edge, and a whole test.

Each part is started and stopped ``--runs`` times through the helpers the fixtures
wrap (cipherface.testing), side by side in one run; then docs/testing.md's example is
run ``--runs`` times as its own pytest process (what an integrator's CI pays).

    python bench/bench_plugin.py               # 5 runs each
    python bench/bench_plugin.py --runs 10 --json out.json

Times are wall clock on whatever else the machine is doing: the load average is
printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cipherface.testing.brokers import open_broker
from cipherface.testing.recorder import Recorder, integrator_filters
from cipherface.testing.services import make_keys, new_site_id, open_cloud, open_edge

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn: Callable[[], None], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _example() -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    match = re.search(r"<!-- example: test_access\.py.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/testing.md lost its example"
    return match.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)

        def broker() -> None:
            with open_broker():
                pass

        def broker_and_cloud() -> None:
            with open_broker() as b, open_cloud(broker_url=b.url, data_dir=base / new_site_id()):
                pass

        results["broker (function fixture)"] = _timed(broker, args.runs)
        results["broker + cloud (function fixtures)"] = _timed(broker_and_cloud, args.runs)

        def keygen() -> None:
            make_keys(base / new_site_id())

        results["site keys (CKKS, Dlib 128-d)"] = _timed(keygen, args.runs)
        keys = make_keys(base / "keys")

        def full_stack() -> None:
            site = new_site_id()
            with (
                open_broker() as b,
                open_cloud(broker_url=b.url, data_dir=base / site, sites=[site]),
                Recorder(url=b.url, filters=integrator_filters(site)),
                open_edge(broker_url=b.url, keys=keys, site=site),
            ):
                pass

        results["broker + cloud + events + edge (key published)"] = _timed(full_stack, args.runs)

        test = base / "example" / "test_access.py"
        test.parent.mkdir()
        test.write_text(_example())
        plugin = ["-p", "cipherface.testing.plugin"]
        # The entry point loads it where this install has it; loading it twice fails.
        if any(ep.value == plugin[1] for ep in entry_points(group="pytest11")):
            plugin = []
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, str(test)]

        def example() -> None:
            subprocess.run(cmd, check=True, capture_output=True, cwd=test.parent, timeout=300)

        results["docs/testing.md example (pytest process)"] = _timed(example, args.runs)
    load = os.getloadavg()
    print(f"runs: {args.runs}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'what':<50} {'median s':>9} {'min s':>7} {'max s':>7}")
    table: dict[str, Any] = {}
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<50} {med:>9.3f} {min(times):>7.3f} {max(times):>7.3f}")
        table[name] = {"median_s": med, "min_s": min(times), "max_s": max(times), "runs": times}
    if args.json:
        args.json.write_text(json.dumps({"load": load, "results": table}, indent=2))


if __name__ == "__main__":
    main()
