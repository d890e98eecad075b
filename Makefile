# atscale: two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast worker gpu-worker flower replay bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=python3.x)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## the whole pipeline offline on this machine: embedded Redis, replay search, workers, training
demo: $(STAMP)
	$(BIN)/atscale demo $(ARGS)

## the test suite (what CI runs)
test: $(STAMP)
	$(BIN)/pytest -q -rs $(ARGS)

## unit tests only (no worker processes)
test-fast: $(STAMP)
	$(BIN)/pytest -q -rs -m "not integration" $(ARGS)

## against your own Redis / MinIO / SerpApi (see README "Running on a real cluster")
worker: $(STAMP)
	$(BIN)/celery -A tasks worker -Q search,download -c $${CONCURRENCY:-4} -n download@%h -E --loglevel INFO

gpu-worker: $(STAMP)
	$(BIN)/celery -A tasks worker -Q gpu -c 1 --pool threads -n gpu$${CUDA_VISIBLE_DEVICES:-0}@%h -E --loglevel INFO

flower: $(STAMP)
	@test -n "$$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password"; exit 1; }
	$(BIN)/celery -A tasks flower --address=$${FLOWER_ADDRESS:-127.0.0.1} --port=$${FLOWER_PORT:-5555} --basic-auth="$$FLOWER_BASIC_AUTH"

replay: $(STAMP)
	$(BIN)/atscale replay --port $${REPLAY_PORT:-8765}

clean:
	rm -rf atscale-data .pytest_cache
