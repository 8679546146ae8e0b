# syntax=docker/dockerfile:1
#
# One Dockerfile, one target per deployable, each with only its own dependencies
# (pyproject.toml extras): ingestion and feedback carry neither torch nor feast.
#   --target ingestion | feedback | features | inference | joiner | trainer | rollout
#   --target triton: the NVIDIA Triton container plus onnxruntime, because the python-backend
#       model (services/loopmesh/mesh/triton_python_model.py) runs the trainer's model.onnx
#       with onnxruntime and NVIDIA's image ships none for the python backend (no torch).
#   (default, last stage) "service": every deployable and the dev stack in one image; pick
#       one with `loopmesh serve <name>`.
#
#   docker build --target ingestion -t loopmesh-ingestion:dev .
#   docker build --target triton -t loopmesh-triton:dev .
#   CPU-only torch for the trainer, ~3 GB smaller:
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
#
# The base images are build arguments. PYTHON_IMAGE needs Python 3.11 as `python` with venv
# and pip, apt, and groupadd/useradd: python:3.11-slim by default, or a Debian bookworm root
# filesystem with python3-venv and python-is-python3 where no registry can be reached
# (scripts/compose-test.sh builds one with debootstrap). GO_IMAGE needs `go` on PATH.

ARG PYTHON_IMAGE=python:3.11-slim
# The data plane (dataplane/, Go): built here, copied into the inference and features images.
ARG GO_IMAGE=golang:1.26-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-py3
# Keep in step with pyproject.toml (devstack, trainer): the model.onnx the trainer writes and
# checks with this onnxruntime is run by it inside Triton.
ARG ONNXRUNTIME_VERSION=1.23.2
ARG TORCH_INDEX=
ARG LOOPMESH_UID=10001

# ---------------------------------------------------------------------------------------
FROM ${TRITON_IMAGE} AS triton
ARG ONNXRUNTIME_VERSION
ARG LOOPMESH_UID
# The python backend stub runs the image's python3. PIP_BREAK_SYSTEM_PACKAGES lets pip
# install into it on Ubuntu 24.04 (PEP 668); it is this container's only Python user.
# CPU onnxruntime; on GPUs, LOOPMESH_TRAINER__TRITON_BACKEND=onnxruntime serves the same
# versions with Triton's own onnxruntime backend (CUDA, TensorRT) instead.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
        "onnxruntime==${ONNXRUNTIME_VERSION}" \
    && python3 -c "import onnxruntime, numpy" \
    && mkdir -p /models \
    && chown "${LOOPMESH_UID}:${LOOPMESH_UID}" /models
# /models is owned by the service user so whichever container first mounts the shared
# model-repository volume, the trainer can still write to it.
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit"]

# ---------------------------------------------------------------------------------------
FROM ${GO_IMAGE} AS dataplane
WORKDIR /src
# Modules first (go.mod/go.sum pin every one), so editing code does not re-download them.
COPY dataplane/go.mod dataplane/go.sum ./
RUN go mod download
COPY dataplane/ ./
RUN CGO_ENABLED=0 go build -trimpath -o /out/loopmesh-dataplane ./cmd/loopmesh-dataplane

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Compilers only here, for any dependency without a wheel; the final images have none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first, from pyproject.toml alone (an empty package and an empty README.md, the
# readme pyproject.toml names, stand in for the code and the docs), so editing code or docs
# does not re-download torch. Each deps-* stage is one extra's venv.
COPY pyproject.toml ./
RUN mkdir -p services/loopmesh && touch services/loopmesh/__init__.py README.md

FROM build AS deps-base
RUN python -m venv /opt/venv && /opt/venv/bin/pip install . && /opt/venv/bin/pip uninstall -y loopmesh

FROM build AS deps-features
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[features]" \
    && /opt/venv/bin/pip uninstall -y loopmesh

FROM build AS deps-inference
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[inference]" \
    && /opt/venv/bin/pip uninstall -y loopmesh

FROM build AS deps-joiner
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[joiner]" \
    && /opt/venv/bin/pip uninstall -y loopmesh

FROM build AS deps-trainer
ARG TORCH_INDEX
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} ".[trainer]" \
    && /opt/venv/bin/pip uninstall -y loopmesh

FROM build AS deps-rollout
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[rollout]" \
    && /opt/venv/bin/pip uninstall -y loopmesh

FROM build AS deps-all
ARG TORCH_INDEX
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} ".[devstack]" \
    && /opt/venv/bin/pip uninstall -y loopmesh

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
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
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOOPMESH_MODEL_REPOSITORY=/models
WORKDIR /var/lib/loopmesh
# gRPC: ingestion 50051, feedback 50052, features 50053, inference 50054, trainer 50055,
# rollout 50056, joiner 50057 (health only); Prometheus metrics 9464 when LOOPMESH_TELEMETRY__METRICS_PORT says so.
EXPOSE 50051 50052 50053 50054 50055 50056 50057 9464
# No HEALTHCHECK: compose runs `python -m loopmesh.mesh.healthcheck 127.0.0.1:<port>` and
# Kubernetes uses its grpc probe, both against the gRPC health service.
# Each target: its venv, then the source (after the venv, so a code change rebuilds only the
# layers from here on and never re-copies a venv: the trainer's is gigabytes), then the code
# installed editable (mesh/feature_repo.py finds the Feast definitions at <source
# root>/feature_store, which a site-packages install lacks). chmod: the checkout's modes come
# along, and a directory the service user cannot read (scripts/protogen.py renames a mkdtemp
# directory into services/loopmesh/gen, mode 0700) made every service fail with "No module
# named 'loopmesh.gen.loopmesh'" while the import checks, run as root, passed.

FROM runtime AS ingestion
ARG LOOPMESH_UID
COPY --from=deps-base /opt/venv /opt/venv
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.ingestion.__main__" \
    && python -c "import importlib.util as u; assert not u.find_spec('torch') and not u.find_spec('feast')"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "ingestion"]

FROM runtime AS feedback
ARG LOOPMESH_UID
COPY --from=deps-base /opt/venv /opt/venv
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.feedback.__main__" \
    && python -c "import importlib.util as u; assert not u.find_spec('torch') and not u.find_spec('feast')"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "feedback"]

FROM runtime AS features
ARG LOOPMESH_UID
COPY --from=deps-features /opt/venv /opt/venv
# Beside the venv's python, where the features service looks for it (its GetOnlineFeatures).
COPY --from=dataplane /out/loopmesh-dataplane /opt/venv/bin/loopmesh-dataplane
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.features.__main__"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "features"]

FROM runtime AS inference
ARG LOOPMESH_UID
COPY --from=deps-inference /opt/venv /opt/venv
# Beside the venv's python, where the gateway looks for it (it runs it as its child).
COPY --from=dataplane /out/loopmesh-dataplane /opt/venv/bin/loopmesh-dataplane
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.inference.__main__"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "inference"]

FROM runtime AS joiner
ARG LOOPMESH_UID
COPY --from=deps-joiner /opt/venv /opt/venv
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.joiner.__main__"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "joiner"]

FROM runtime AS trainer
ARG LOOPMESH_UID
COPY --from=deps-trainer /opt/venv /opt/venv
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.trainer.__main__"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "trainer"]

FROM runtime AS rollout
ARG LOOPMESH_UID
COPY --from=deps-rollout /opt/venv /opt/venv
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.rollout.__main__"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "rollout"]

FROM runtime AS service
ARG LOOPMESH_UID
COPY --from=deps-all /opt/venv /opt/venv
COPY --from=dataplane /out/loopmesh-dataplane /opt/venv/bin/loopmesh-dataplane
COPY . /app
RUN chmod -R a+rX /app && pip install --no-deps -e /app && python -c "import loopmesh.cli, loopmesh.mesh.healthcheck"
USER ${LOOPMESH_UID}:${LOOPMESH_UID}
CMD ["loopmesh", "serve", "ingestion"]
