#!/usr/bin/env bash
# What a GPU run needs beside the repo, into .whl/ (git-ignored): the wheels the machine's image lacks, for python
# 3.12 x86_64, at the versions installed here, and the default model's tokenizer (borrowed by the dummy-weight
# structured-output benchmark). The image has torch, triton, transformers, safetensors, pyarrow, click, pyyaml;
# it lacks (seen 2026-11-30) gguf and accelerate (converting the default model), pydantic, llguidance, jsonschema
# (`batchgen bench` failed on its import), redis-py and Celery's stack (the CLI imports kombu's errors);
# pytest-xdist: `pytest -n 8 tests/kernels tests/engine` fits one device call (one process takes ~9 minutes).
# Its transformers (5.17) is older than batchgen needs (>= 5.18: 5.17 converts the default model's tokenizer
# wrongly), so this one's comes too, with the newest huggingface_hub 1.x (transformers >= 5.18 needs >= 1.31;
# hub 2 would need packages the image lacks, 1.x needs those the image's own 1.x has).
# Carry `.whl` with the device call; benchmarks/gpu_run.sh CALL installs them, then batchgen itself:
#   python3 -m pip install -q --no-index --no-deps .whl/*.whl
#   python3 -m pip install -q --no-deps --no-build-isolation .
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { for dist in "$@"; do echo "$dist==$(python3 -c "import importlib.metadata as m; print(m.version('$dist'))")"; done; }
rm -rf .whl && mkdir .whl   # one version of each: two stop the install
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl annotated_types typing_inspection pytest-xdist execnet 'huggingface_hub<2' \
  $(pinned transformers accelerate gguf pydantic pydantic_core llguidance celery kombu amqp vine billiard \
    click-didyoumean click-plugins click-repl tzlocal jsonschema jsonschema-specifications referencing rpds-py redis)
mkdir .whl/tokenizer
model_dir=$(python3 -c "from batchgen.default_model import ensure_default_model; print(ensure_default_model())")
cp "$model_dir"/tokenizer.json "$model_dir"/tokenizer_config.json "$model_dir"/chat_template.jinja .whl/tokenizer/
ls -la .whl .whl/tokenizer
