# syntax=docker/dockerfile:1
#
# One Dockerfile, two images:
#   (default, last stage) "service": every LoopMesh service; pick one with
#       `loopmesh serve <name>` (compose and the k8s manifests set the command).
#   --target triton: the NVIDIA Triton container plus torch, because the python-backend
#       model (services/loopmesh/mesh/triton_python_model.py) loads TorchScript with torch and
#       NVIDIA's image ships no torch for the python backend.
#
#   docker build -t loopmesh:dev .
#   docker build --target triton -t loopmesh-triton:dev .
#   CPU-only, ~3 GB smaller: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu

ARG PYTHON_IMAGE=python:3.11-slim
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-py3
# Keep in step with pyproject.toml: model.pt written by the trainer is loaded by this torch.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
ARG LOOPMESH_UID=10001

# ---------------------------------------------------------------------------------------
FROM ${TRITON_IMAGE} AS triton
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG LOOPMESH_UID
# The python backend stub runs the image's python3. PIP_BREAK_SYSTEM_PACKAGES lets pip
# install into it on Ubuntu 24.04 (PEP 668); it is this container's only Python user.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}" \
    && mkdir -p /models \
    && chown "${LOOPMESH_UID}:${LOOPMESH_UID}" /models
# /models is owned by the service user so whichever container first mounts the shared
# model-repository volume, the trainer can still write to it.
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit"]

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Compilers only here, for any dependency without a wheel; the final image has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
WORKDIR /app
# Dependencies first, from pyproject.toml alone, so editing code does not re-download torch.
COPY pyproject.toml README.md ./
RUN mkdir -p services/loopmesh && touch services/loopmesh/__init__.py \
    && pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} . \
    && pip uninstall -y loopmesh \
    && rm -rf services build *.egg-info
COPY . .
# Editable on purpose: services/loopmesh/mesh/feature_repo.py finds the Feast definitions at
# <source root>/feature_store, which a site-packages install would not have.
RUN pip install --no-deps -e . \
    && python -c "import loopmesh.cli, loopmesh.mesh.healthcheck"

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
ARG LOOPMESH_UID
# Non-root, with a writable home that is also the working directory: relative defaults
# such as .loopmesh/... land there, and the source tree stays read-only.
RUN groupadd --system --gid "${LOOPMESH_UID}" loopmesh \
    && useradd --system --uid "${LOOPMESH_UID}" --gid loopmesh \
        --home-dir /var/lib/loopmesh --create-home --shell /usr/sbin/nologin loopmesh \
    && mkdir -p /models /var/lib/loopmesh/feature_store /var/lib/loopmesh/trainer \
    && chown loopmesh:loopmesh /models /var/lib/loopmesh/feature_store /var/lib/loopmesh/trainer
# Mount points of compose's named volumes exist here, owned by the service user, so Docker
# initialises each new volume with that owner (a missing path would come up root-owned).
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOOPMESH_MODEL_REPOSITORY=/models
WORKDIR /var/lib/loopmesh
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
# gRPC: ingestion 50051, feedback 50052, features 50053, inference 50054, trainer 50055,
# rollout 50056; Prometheus metrics 9464 when LOOPMESH_TELEMETRY__METRICS_PORT says so.
EXPOSE 50051 50052 50053 50054 50055 50056 9464
# No HEALTHCHECK: compose runs `python -m loopmesh.mesh.healthcheck 127.0.0.1:<port>` and
# Kubernetes uses its grpc probe, both against the gRPC health service.
CMD ["loopmesh", "serve", "ingestion"]
