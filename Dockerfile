# GPU image: CUDA 12 runtime, the CPU requirement set plus onnxruntime-gpu and CUDA torch.
# (Cannot be built on the development machines, which have no Docker engine.)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AVATAR_SERVER__HOST=0.0.0.0 \
    AVATAR_SERVER__PORT=8080 \
    AVATAR_AVATARS__DATA_DIR=/data

# deadsnakes-free: Ubuntu 24.04's python3 is 3.12; av 18.x and the pins support it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        build-essential libgl1 libglib2.0-0 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 avatar \
 && mkdir -p /app /data && chown avatar:avatar /app /data
WORKDIR /app

# one image for every role: a standalone server, a front, a media node, the inference pool
# (requirements-pool.txt is requirements.txt plus Ray Serve)
COPY --chown=avatar:avatar requirements.txt requirements-pool.txt requirements-gpu.txt ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install -r requirements-pool.txt \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install -r requirements-gpu.txt
ENV PATH=/opt/venv/bin:$PATH

COPY --chown=avatar:avatar rtc_server ./rtc_server
COPY --chown=avatar:avatar media_tracks ./media_tracks
COPY --chown=avatar:avatar pipeline ./pipeline
COPY --chown=avatar:avatar avatars ./avatars
COPY --chown=avatar:avatar face ./face
COPY --chown=avatar:avatar config ./config
COPY --chown=avatar:avatar common ./common
COPY --chown=avatar:avatar web ./web

USER avatar
EXPOSE 8080
# WebRTC media uses UDP ports chosen by ICE: run with --network host, or configure a TURN
# server (webrtc.ice_servers) reachable from your clients.
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
CMD ["python3", "-m", "rtc_server"]
