#!/usr/bin/env bash
# What a GPU run needs beside the repo, into .whl/ (git-ignored: `echo /.whl/ >> .git/info/exclude`):
# the wheels the machine's image lacks (it has torch, triton, transformers, safetensors, pyarrow, click), for
# python 3.12 x86_64, and the default model's tokenizer (borrowed by the dummy-weight structured-output
# benchmark). Carry `.whl` with the device call and start its command with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/wsite .whl/*.whl && export PYTHONPATH=/tmp/wsite
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl   # one version of each: two stop the install
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic_core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated_types typing_inspection \
  "llguidance==$(python3 -c 'import importlib.metadata as m; print(m.version("llguidance"))')"
mkdir .whl/tokenizer
model_dir=$(python3 -c "from batchgen.default_model import ensure_default_model; print(ensure_default_model())")
cp "$model_dir"/tokenizer.json "$model_dir"/tokenizer_config.json .whl/tokenizer/
ls -la .whl .whl/tokenizer
