# CipherFace agents image.
#   cloud: docker build -t cipherface:cloud .                       (HE + MQTT only)
#   edge:  docker build -t cipherface:edge --build-arg EXTRAS=edge .  (+ deepface, dlib)
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp1: OpenMP runtime of the SEAL (TenSEAL) and numba wheels;
# libglib2.0-0: needed by OpenCV on the edge.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md* mosquitto.conf ./
COPY cipherface ./cipherface
COPY crypto ./crypto
COPY protocol ./protocol
COPY agents ./agents
COPY faces ./faces
COPY cameras ./cameras
COPY store ./store
COPY observe ./observe
COPY testing ./testing
RUN pip install "/src${EXTRAS:+[$EXTRAS]}" && rm -rf /src

# An unprivileged user; /data and /keys are named volumes, which start with the
# ownership and mode of these directories.
RUN useradd --system --uid 10001 --create-home --home-dir /home/cipherface cipherface \
    && install -d -o cipherface -g cipherface -m 0700 /data /keys
USER cipherface
WORKDIR /home/cipherface
ENV DEEPFACE_HOME=/home/cipherface \
    CIPHERFACE_DATA=/data \
    CIPHERFACE_KEYS=/keys

CMD ["cipherface", "--help"]
