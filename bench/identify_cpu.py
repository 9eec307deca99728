"""One shard's identify cost on one core: the fixed part and the part per template.

Builds a CKKS gallery of ``--blocks`` blocks of 4,096 templates (one encrypted block,
enrolled again and again: every enrollment re-randomises it) and measures, in CPU
time, the cloud's identify (best of 3) and the re-randomisation of the probe's 128
ciphertexts that every shard pays once per identify. Run it with one numba thread to
get the per-core figures the 100 M projection (docs/deployment.md 6d) uses:

    NUMBA_NUM_THREADS=1 python bench/identify_cpu.py --blocks 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cipherface.crypto import sites
from cipherface.crypto.ckks import decode
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.errors import DecodeError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--blocks", type=int, default=32, help="blocks of 4,096 templates")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cf-identify-cpu-"))
    try:
        sites.generate_key_dir(work / "keys", dim=128)
        cipher = sites.load_edge_cipher(work / "keys")
        g = sites.open_gallery(work / "g", cipher.public_key_bytes())
        assert isinstance(g, CkksGallery)
        rng = np.random.default_rng(0)
        v = rng.normal(size=(4096, 128))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        payload = cipher.encrypt_templates(v)
        for b in range(args.blocks):
            g.enroll([f"b{b}-{i}" for i in range(4096)], payload)
        probe = cipher.encrypt_probe(v[5], op="identify")
        g.identify(probe)  # blocks in memory, kernels compiled
        g.pub.zeros.stop()  # every encryption of zero on the spot, as under load
        cts = decode(probe, g.pub, "probe-identify", DecodeError)["cts"]
        t = time.process_time()
        g._receive(cts, g.dim, "probe-identify")
        fixed = time.process_time() - t
        runs = []
        for _ in range(3):
            t = time.process_time()
            _, count = g.identify(probe)
            runs.append(time.process_time() - t)
        total = min(runs)
        g.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per = (total - fixed) / count
    threads = os.environ.get("NUMBA_NUM_THREADS", "all")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{count:,} templates, NUMBA_NUM_THREADS={threads}, load average {load}")
    print(f"identify: {total:.3f} s CPU (best of 3)")
    print(f"  probe re-randomisation (once per shard): {fixed:.3f} s CPU")
    print(f"  the rest: {per * 1e6:.3f} us CPU per template ({1 / per:,.0f} templates/s)")


if __name__ == "__main__":
    main()
