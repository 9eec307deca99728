"""Latency of one 1280x720 camera frame (JPEG bytes) -> one L2-normalised face embedding.

Builds the frame from the fetched obama.jpg (run .ci/setup_data.sh first): the photo is
scaled to the frame's height and centred on grey, then JPEG-encoded, so each timed call
pays decoding, downscaling, detection, alignment and the model, as the edge agent does.

    python bench/bench_faces.py [--runs 20] [--max-side 640] [--model Dlib] [--detector dlib]
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from cipherface.crypto import thresholds
from cipherface.faces import Embedder, find_photos

FRAME_W, FRAME_H = 1280, 720


def camera_frame() -> bytes:
    """Return obama.jpg letterboxed into a 1280x720 frame, as JPEG bytes."""
    photo = cv2.imread(str(find_photos(["obama"])["obama"]))
    if photo is None:
        raise SystemExit("cannot read obama.jpg: run .ci/setup_data.sh")
    scale = FRAME_H / photo.shape[0]
    face = cv2.resize(photo, (round(photo.shape[1] * scale), FRAME_H), interpolation=cv2.INTER_AREA)
    frame = np.full((FRAME_H, FRAME_W, 3), 128, dtype=np.uint8)
    left = (FRAME_W - face.shape[1]) // 2
    frame[:, left : left + face.shape[1]] = face
    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise SystemExit("JPEG encoding failed")
    return jpeg.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-side", type=int, default=640, help="0 = no downscaling")
    parser.add_argument("--model", default="Dlib")
    parser.add_argument("--detector", default="dlib")
    args = parser.parse_args()

    jpeg = camera_frame()
    emb = Embedder(model_name=args.model, detector=args.detector, max_side=args.max_side or None)
    t0 = time.perf_counter()
    emb.warmup()
    load_s = time.perf_counter() - t0

    first = emb.represent(jpeg, name="frame1280x720.jpg")  # also warms caches
    reference = emb.represent(find_photos(["obama2"])["obama2"])
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        vec = emb.represent(jpeg, name="frame1280x720.jpg")
        times.append(time.perf_counter() - t)
    assert np.allclose(vec, first), "embedding is not deterministic"
    times.sort()
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    dist = thresholds.distance_from_similarity(float(first @ reference), "cosine")
    print(
        f"faces: {args.model}/{args.detector}, max_side={args.max_side or 'off'}, "
        f"{FRAME_W}x{FRAME_H} JPEG ({len(jpeg) // 1024} KiB) -> {emb.dim}-d embedding"
    )
    print(f"  model load (warmup): {load_s * 1000:.0f} ms")
    print(
        f"  per frame over {args.runs} runs: median {statistics.median(times) * 1000:.0f} ms, "
        f"min {times[0] * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms"
    )
    print(
        f"  sanity: frame vs obama2.jpg cosine distance {dist:.4f} "
        f"(threshold {thresholds.threshold(args.model, 'cosine')})"
    )


if __name__ == "__main__":
    main()
