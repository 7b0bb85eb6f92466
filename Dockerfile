# embedq worker for NVIDIA GPUs, on NVIDIA's TensorRT container (TensorRT, CUDA, Python 3):
# `--backend auto` uses TensorRT where the GPU supports the plan, else torch with CUDA graphs.
#   docker build -t embedq:gpu .
#   docker run --gpus all --stop-timeout 90 -e EMBEDQ_REDIS_URL=redis://redis:6379/0 -e EMBEDQ_JOB=corpus \
#       -v /data:/data embedq:gpu work --job corpus --out /data/out
# --stop-timeout: `docker stop` waits 10 s by default before SIGKILL; a worker drains for up to
# --shutdown-timeout (60 s). EMBEDQ_JOB is what the health check asks about (`--job` alone is not
# read by it). For CPUs: Dockerfile.cpu.
FROM nvcr.io/nvidia/tensorrt:25.10-py3

# The image's own Python is the one with TensorRT's bindings, so embedq installs into it; the
# variable lets pip do that where the base marks that Python externally managed (PEP 668). An ARG,
# so that it is set while building only.
ARG PIP_BREAK_SYSTEM_PACKAGES=1
# torch built for CUDA 13.0, the CUDA of 25.10 (check it when changing the tag), at the version
# pyproject's dev extra pins.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
RUN python3 -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/embedq
COPY pyproject.toml README.md ./
COPY embedq embedq
COPY producer producer
COPY worker worker
COPY engines engines
# A numeric user, so that Kubernetes' runAsNonRoot can check it without a passwd file.
RUN python3 -m pip install --no-cache-dir . \
 && groupadd --system --gid 10001 embedq \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/embedq embedq

USER 10001:10001
WORKDIR /home/embedq
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 EMBEDQ_CACHE_DIR=/home/embedq/.cache/embedq
# Healthy while Redis answers (with the credentials given) and knows the job: `embedq status` exits
# 5 when Redis does not answer, 2 when the job does not exist. Docker wants 1 for unhealthy.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
  CMD ["sh", "-c", "embedq status --job \"$EMBEDQ_JOB\" > /dev/null || exit 1"]
STOPSIGNAL SIGTERM
# NVIDIA's entrypoint prepares the CUDA environment (forward compatibility on older drivers), then
# runs the command in its place.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "embedq"]
CMD ["--help"]
