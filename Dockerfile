# Apertis Studio in a container, for a shared server.
#
#   docker build -t apertis-studio .                                   # CPU (default)
#   docker build -t apertis-studio:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -p 127.0.0.1:7860:7860 -e APERTIS_AUTH=user:password \
#       -v apertis-workspace:/workspace apertis-studio
#
# The studio listens on 0.0.0.0 inside the container, so it refuses to start without credentials:
# pass APERTIS_AUTH=USER:PASSWORD in the environment (see docker-compose.yml and the README).
# CUDA: build with a CUDA wheel index as TORCH_INDEX (or https://pypi.org/simple, whose Linux wheels are CUDA
# builds) and run with `--gpus all` (NVIDIA Container Toolkit); the driver comes from the host.
FROM python:3.11-slim

# Where torch and torchvision come from. The CPU index has no CUDA libraries (an image ~2 GB smaller).
# Fallback: if that index lacks the pinned versions, build with --build-arg TORCH_INDEX=https://pypi.org/simple.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Keep these two equal to the pins in requirements.txt (tests/test_container_files.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False

WORKDIR /app

# Dependencies first, so editing the code does not reinstall them. torch and torchvision come from
# TORCH_INDEX; the rest from requirements.txt without torch, torchvision and pyinstaller (desktop builds only).
COPY requirements.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && grep -vE '^(torch|torchvision|pyinstaller)[=<>~!]' requirements.txt > /tmp/requirements-app.txt \
    && pip install --no-cache-dir -r /tmp/requirements-app.txt \
    && rm /tmp/requirements-app.txt

# A user without root rights runs the studio; it owns only the workspace.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin apertis \
    && mkdir -p /workspace \
    && chown apertis:apertis /workspace

COPY pyproject.toml ./
COPY apertis_core/ ./apertis_core/
COPY studio/ ./studio/
COPY assets/ ./assets/

USER 1000:1000
ENV HOME=/home/apertis

# Datasets, runs, models and the registry live here: mount a volume or a host folder (owned by uid 1000).
VOLUME /workspace
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]

CMD ["python", "-m", "studio", "--host", "0.0.0.0", "--port", "7860", "--workspace", "/workspace", "--no-browser"]
