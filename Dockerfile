# embedq in a container. CPU image by default; for NVIDIA GPUs build with a CUDA build of torch:
#   docker build -t embedq .                                              # CPU
#   docker build -t embedq:cuda --build-arg TORCH="torch --index-url https://download.pytorch.org/whl/cu130" .
#   docker run --gpus all -e EMBEDQ_REDIS_URL=redis://redis:6379/0 -v /data:/data embedq:cuda \
#       work --job corpus --out /data/out
FROM python:3.11-slim

# redis-server lets `embedq run` start a private Redis when none is given.
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*

ARG TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
RUN pip install --no-cache-dir ${TORCH}

WORKDIR /opt/embedq
COPY pyproject.toml README.md ./
COPY embedq embedq
COPY producer producer
COPY worker worker
COPY engines engines
RUN pip install --no-cache-dir . \
 && useradd --system --create-home embedq

USER embedq
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 EMBEDQ_CACHE_DIR=/home/embedq/.cache/embedq
ENTRYPOINT ["embedq"]
CMD ["--help"]
