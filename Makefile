# Two commands on a fresh machine: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.ckconv-installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install test demo bench fuzz fixtures clean

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch exactly as DEVELOPERS.md says: pip takes these two from local disk (a CUDA build that runs on CPU).
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PIP) install -q -e '.[test,torch]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	@mkdir -p .demo
	$(VENV)/bin/ckconv inspect fixtures/tiny_bundle.pth
	$(VENV)/bin/ckconv convert fixtures/tiny_bundle.pth .demo/tiny_bundle.safetensors --force
	$(VENV)/bin/ckconv convert .demo/tiny_bundle.safetensors .demo/tiny_bundle_back.pth --force
	$(VENV)/bin/ckconv diff fixtures/tiny_bundle.pth .demo/tiny_bundle_back.pth

bench: install
	$(PY) bench/run.py

fuzz: install
	CKCONV_FUZZ_EXAMPLES=20000 $(PY) -m pytest tests/test_fuzz.py -q
	CKCONV_DIFF_COUNT=$${CKCONV_DIFF_COUNT:-3000} CKCONV_DIFF_SEED=$${CKCONV_DIFF_SEED:-$$(date +%s)} $(PY) -m pytest tests/test_differential.py -q -k harness

fixtures: install
	$(PY) fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) .demo .pytest_cache
