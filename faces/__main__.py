"""``python -m cipherface.faces``: set up the offline weights, or embed photos."""

from __future__ import annotations

import argparse
import sys

from cipherface.crypto import thresholds
from cipherface.errors import LocalError
from cipherface.faces.embedder import Embedder
from cipherface.faces.paths import cache_home, deepface_home, weights_dir
from cipherface.faces.weights import DETECTORS, MODELS, ensure_dlib_weights


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m cipherface.faces``: set up the offline weights, or embed photos.

    Args:
      argv (list[str] | None): arguments (default: ``sys.argv[1:]``).

    Returns:
      int: the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m cipherface.faces")
    parser.add_argument(
        "--setup", action="store_true", help="link the Dlib weights into deepface's folder"
    )
    parser.add_argument("--where", action="store_true", help="print the folders in use")
    parser.add_argument("images", nargs="*", help="photos to embed (prints pairwise distances)")
    parser.add_argument("--model", default="Dlib", choices=MODELS)
    parser.add_argument("--detector", default="dlib", choices=DETECTORS)
    args = parser.parse_args(argv)
    try:
        if args.setup:
            folder = ensure_dlib_weights()
            print(f"Dlib weights ready in {folder}")
        if args.where:
            print(f"cache home:    {cache_home()}")
            print(f"deepface home: {deepface_home()}")
            print(f"weights:       {weights_dir()}")
            print(f"photos:        {cache_home() / 'photos'}")
        if args.images:
            emb = Embedder(model_name=args.model, detector=args.detector)
            vecs = [emb.represent(p) for p in args.images]
            limit = thresholds.threshold(args.model, "cosine")
            for i, a in enumerate(vecs):
                for j in range(i + 1, len(vecs)):
                    dist = thresholds.distance_from_similarity(float(a @ vecs[j]), "cosine")
                    verdict = "match" if dist <= limit else "no match"
                    print(f"{args.images[i]} ~ {args.images[j]}: cosine {dist:.4f} ({verdict})")
        if not (args.setup or args.where or args.images):
            parser.print_help()
    except LocalError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
