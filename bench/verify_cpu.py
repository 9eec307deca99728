"""Where one verify's CPU goes in the cloud, stage by stage (one thread, no broker).

Runs each stage of :func:`cipherface.crypto.ckks.pack_result` (what a compute worker
does per verify) and of the agent's own part (decode the request, prepare the job,
encode the reply) many times on the same inputs and prints the CPU time of each, the
best of ``--rounds`` rounds (other processes on a shared machine only ever add time).
The zero pool is stopped, so every encryption of zero is made on the spot, as under
saturation (the pool fills only while the process is idle).

    python bench/verify_cpu.py
    python bench/verify_cpu.py --rounds 9 --n 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import tenseal.sealapi as sealapi

from cipherface.crypto import seal, sites
from cipherface.crypto.ckks import decode, finish_verify, flood, header, ring_of
from cipherface.crypto.ckks_gallery import CkksGallery
from cipherface.errors import DecodeError
from cipherface.protocol import (
    Verify,
    decode_request,
    encode,
    now_ms,
    parse_request_topic,
    result_for,
)
from cipherface.protocol import request_topic as req_topic


def best_ms(fn: Callable[[], Any], n: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cf-verify-cpu-"))
    try:
        sites.generate_key_dir(work / "keys", dim=128)
        cipher = sites.load_edge_cipher(work / "keys")
        g = sites.open_gallery(work / "g", cipher.public_key_bytes())
        assert isinstance(g, CkksGallery)
        rng = np.random.default_rng(1)
        v = rng.normal(size=(64, 128))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        g.enroll([f"p{i}" for i in range(64)], cipher.encrypt_templates(v))
        pub, p = g.pub, g.params
        ring = ring_of(p)
        pub.zeros.stop()  # every zero on the spot, as under saturation
        probe = cipher.encrypt_probe(v[3], op="verify")
        msg = Verify(site="s", gw="gw", kid=cipher.key_id, identity="p3", probe=probe)
        topic, payload = req_topic("s", "gw", "verify"), encode(msg)
        rt = parse_request_topic(topic)
        job = g.prepare_verify("p3", probe)
        raw = decode(probe, pub, "probe-verify", DecodeError)["ct"]
        ctx = seal.context_for(p)
        _, enc, ev = pub._sealed
        checked = seal.check_seeded(raw, "p", parms_id=pub.data_level, n=p.n, k=2)
        ct = seal.load_into(sealapi.Ciphertext(), checked, ctx)
        saved = seal.save_bytes(ct)
        x = seal.parse_ciphertext(
            saved, what="x", parms_id=pub.data_level, size=2, n=p.n, q=ring.q
        ).data
        small = np.zeros(p.n, dtype=bool)
        small[:: pub.dim] = True
        f = flood(p, small)
        t64 = job.template.astype(np.uint64)
        res = ring.mul_rescale_ntt(t64, x, f)
        ctb = seal.ciphertext_bytes(res, parms_id=pub.result_level, scale=p.result_scale)
        body = {**header(pub, "result-verify"), "count": 1, "pos": 3, "ct": ctb}
        result = msgpack.packb(body, use_bin_type=True)
        req = decode_request(rt, payload, max_size=1 << 26, now_ms=now_ms())
        stages: list[tuple[str, str, Callable[[], Any]]] = [
            ("agent", "decode + validate the request (msgpack)",
             lambda: decode_request(rt, payload, max_size=1 << 26, now_ms=now_ms())),
            ("agent", "prepare: probe envelope, pack copy under the lock",
             lambda: g.prepare_verify("p3", probe)),
            ("agent", "encode the reply", lambda: encode(result_for(req, ids_version=1,
                                                                  scores=result, count=1))),
            ("worker", "check the probe's SEAL header, inflate (zstd)",
             lambda: seal.check_seeded(raw, "p", parms_id=pub.data_level, n=p.n, k=2)),
            ("worker", "SEAL load (expands the seed, validates)",
             lambda: seal.load_into(sealapi.Ciphertext(), checked, ctx)),
            ("worker", "SEAL encrypt_zero (public key; fresh per verify)",
             lambda: enc.encrypt_zero(sealapi.Ciphertext())),
            ("worker", "SEAL add_inplace (re-randomise)", lambda: ev.add_inplace(ct, ct)),
            ("worker", "SEAL save (SEAL compresses with zstd)", lambda: seal.save_bytes(ct)),
            ("worker", "read the residues back (inflate, check)",
             lambda: seal.parse_ciphertext(saved, what="x", parms_id=pub.data_level, size=2,
                                           n=p.n, q=ring.q)),
            ("worker", "flood + wipe randomness (OS CSPRNG)", lambda: flood(p, small)),
            ("worker", "product + flood + rescale (numba, 6 NTTs)",
             lambda: ring.mul_rescale_ntt(t64, x, f)),
            ("worker", "result as a SEAL ciphertext (zstd level 1)",
             lambda: seal.ciphertext_bytes(res, parms_id=pub.result_level, scale=p.result_scale)),
            ("worker", "= finish_verify, all of the above together",
             lambda: finish_verify(pub, job)),
        ]  # fmt: skip
        rows = []
        for who, what, fn in stages:
            ms = best_ms(fn, args.n, args.rounds)
            rows.append({"where": who, "stage": what, "cpu_ms": round(ms, 3)})
            print(f"{who:6s} {what:52s} {ms:7.3f} ms", flush=True)
        g.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nbest of {args.rounds} x {args.n} calls, CPU time; load average {load}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
