# syntax=docker/dockerfile:1
# DiDE images. Targets:
#   runtime (default, the last stage): the API (`dide-serve`) with the serving extra only, no torch.
#       --build-arg VARIANT=gpu (default): CUDA 13 + cuDNN 9 base, onnxruntime-gpu (needs an NVIDIA driver >= 580);
#       --build-arg VARIANT=cpu: Debian slim base, onnxruntime.
#   trainer: the training + serving extras with CPU torch, for the one-shot `dide-demo build` job.
# Python 3.11 comes from python-build-standalone (installed by uv): it is self-contained (own OpenSSL, libffi,
# SQLite), so one interpreter runs unchanged on the Debian and the Ubuntu/CUDA bases and no apt step is needed.
# Every Python package is pinned by deploy/constraints.txt.

ARG VARIANT=gpu
ARG PYTHON_VERSION=3.11.14

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

# ---- interpreter + uv, shared by every build stage -------------------------------------------------------
FROM debian:13.1-slim AS python
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
RUN uv python install "${PYTHON_VERSION}"
WORKDIR /src
COPY deploy/constraints.txt deploy/constraints.txt

# ---- serving virtualenv: dependencies first (cached layer), then the project itself --------------------------
FROM python AS serving-venv
ARG VARIANT
ARG PYTHON_VERSION
COPY pyproject.toml README.md ./
RUN case "${VARIANT}" in \
        gpu) extra=serving-gpu ;; \
        cpu) extra=serving ;; \
        *) echo "VARIANT must be gpu or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv \
    && uv pip install --python /opt/venv/bin/python --constraint deploy/constraints.txt \
        --requirement pyproject.toml --extra "${extra}"
COPY core core
COPY training training
COPY export export
COPY service service
# The runtime must never carry torch (DESIGN §2): fail the build if any dependency pulled it in.
RUN uv pip install --python /opt/venv/bin/python --no-deps \
        --constraint deploy/constraints.txt --build-constraint deploy/constraints.txt . \
    && /opt/venv/bin/python -c "import importlib.util, sys; \
sys.exit('torch is in the runtime virtualenv' if importlib.util.find_spec('torch') else 0)"

# ---- trainer virtualenv: CPU torch from the PyTorch CPU index, then training + serving extras ----------------
# torch alone (--no-deps) from the CPU index; its dependencies then come from PyPI with the pins, and the
# installed CPU build satisfies the extra's torch==2.13.0, so no CUDA wheels are pulled in.
FROM python AS trainer-venv
ARG PYTHON_VERSION
COPY pyproject.toml README.md ./
RUN uv venv --python "${PYTHON_VERSION}" /opt/venv \
    && uv pip install --python /opt/venv/bin/python --no-deps \
        --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
    && uv pip install --python /opt/venv/bin/python --constraint deploy/constraints.txt \
        --requirement pyproject.toml --extra training --extra serving
COPY core core
COPY training training
COPY export export
COPY service service
RUN uv pip install --python /opt/venv/bin/python --no-deps \
    --constraint deploy/constraints.txt --build-constraint deploy/constraints.txt .

# ---- trainer image: runs `dide-demo build --root /data` once, as the same non-root user as the API ------------
FROM debian:13.1-slim AS trainer
RUN groupadd --system --gid 10001 dide \
    && useradd --system --uid 10001 --gid dide --create-home --home-dir /home/dide dide \
    && mkdir /data && chown dide:dide /data
COPY --from=python /opt/python /opt/python
COPY --from=trainer-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/dide
CMD ["dide-demo", "build", "--root", "/data"]

# ---- runtime bases: pinned tags; the GPU one provides the CUDA runtime, cuBLAS/cuFFT/cuRAND and cuDNN ---------
FROM nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04 AS base-gpu
FROM debian:13.1-slim AS base-cpu

# ---- runtime image (default target) -----------------------------------------------------------------------
# base-${VARIANT} is one of the two pinned stages above; hadolint cannot resolve a stage name built from an
# ARG and reads it as an untagged image, hence the ignore.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
LABEL org.opencontainers.image.title="dide-serve" \
      org.opencontainers.image.description="DiDE dual-encoder VQA / entailment / reasoning API (ONNX Runtime)"
RUN groupadd --system --gid 10001 dide \
    && useradd --system --uid 10001 --gid dide --create-home --home-dir /home/dide dide \
    && mkdir /data && chown dide:dide /data
COPY --from=python /opt/python /opt/python
COPY --from=serving-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DIDE_BUNDLES=/data/bundles/vqa,/data/bundles/entailment,/data/bundles/reasoning \
    DIDE_STORE=/data/store
USER 10001:10001
WORKDIR /home/dide
EXPOSE 8000
# Ready = every ONNX session loaded and warm; urlopen raises on a 503, so the exit status is non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["dide-serve", "--host", "0.0.0.0", "--port", "8000"]
