# Two commands on a fresh machine (each sets up its own virtual environment first, see scripts/setup_env.sh):
#   make demo   the main job: smpart-bench decode (every path against the reference, step after step;
#               timed on a GPU, a short interpreter loop on a CPU); writes ./decode_out/
#   make test   the test suite (pytest, in parallel; the Triton interpreter on a CPU)
# Options: VENV=path (default .venv), PYTHON=python3.x, ARGS='--steps 50 ...' (demo), PYTEST_ARGS='-k topk' (test).
VENV ?= .venv
PYTHON ?= python3
ARGS ?=
PYTEST_ARGS ?= -q

.PHONY: demo test env env-test clean

demo: env
	$(VENV)/bin/smpart-bench decode $(ARGS)

test: env-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

env:
	PYTHON=$(PYTHON) scripts/setup_env.sh $(VENV) demo

env-test:
	PYTHON=$(PYTHON) scripts/setup_env.sh $(VENV) test

clean:
	rm -rf $(VENV) decode_out
