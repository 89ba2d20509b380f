# Two commands on a fresh machine (see README):
#   make run   set up .venv and serve SmolLM2-135M-Instruct (load_aware offloading) on 127.0.0.1:8000
#   make test  set up .venv and run every test CI runs
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run demo test eval test-multinode bench-engine bench-serve bench-offload clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[gpu,test]'
	$(VENV)/bin/python -m adrenaline.kernels.cpu_extension
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/serve run serve_configs/local.yaml

demo: $(STAMP)
	$(VENV)/bin/python -m adrenaline.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

# lm-eval through the served SmolLM2 vs lm-eval's own hf backend (README: "Evaluating with
# lm-eval"). Installs the `eval` extra (lm-eval[api]) into the venv first.
eval: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[eval]'
	HF_DATASETS_OFFLINE=1 $(VENV)/bin/python evals/lm_eval_parity.py

# Only the multi-node tests (root: a Ray cluster of network namespaces; see docs/DEPLOY.md).
# `make test` runs them too where it runs as root; elsewhere they are skipped, with the reason.
test-multinode: $(STAMP)
	$(VENV)/bin/python -m pytest tests/multinode -s

bench-engine: $(STAMP)
	$(VENV)/bin/python -m adrenaline.bench engine --out bench-engine.json

bench-serve: $(STAMP)
	$(VENV)/bin/python -m adrenaline.bench serve --out bench-serve.json

bench-offload: $(STAMP)
	$(VENV)/bin/python -m adrenaline.bench offload --out bench-offload.json

clean:
	rm -rf $(VENV)
