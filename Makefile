# Two commands on a fresh machine (see README):
#   make run   set up .venv and run the main job
#   make test  set up .venv and run every test CI runs
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test bench-engine clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[gpu,test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m adrenaline.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

bench-engine: $(STAMP)
	$(VENV)/bin/python -m adrenaline.bench engine --out bench-engine.json

clean:
	rm -rf $(VENV)
