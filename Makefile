# The two set-up commands of the README: `make warmup` (the main job) and `make test`.
# Both install what they need on a fresh machine. Without torch, torch==2.13.0 is installed first:
# the CPU build where pip's find-links hold that wheel; elsewhere install torch beforehand from
# https://download.pytorch.org/whl/cpu (PyPI's default torch is a multi-GB CUDA build).
# The tests resolve exactly the versions in constraints/test.txt, so a new release of a test
# dependency cannot turn main red overnight; kiln's own requirements stay ranges (pyproject.toml).
PY ?= python3
KILN = $(PY) -m kiln

.PHONY: install install-test test warmup

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e .

install-test:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -c constraints/test.txt -e '.[test]'

# Warm-up of the example model at TP=2 on an embedded Ray cluster (127.0.0.1): GPUs if Ray
# sees two, else two CPU ranks with gloo. Writes the report and a Perfetto trace.
warmup: install
	$(KILN) warmup examples/toy_llama.py:build --tp 2 --sizes 1,2,4,8 \
		--report kiln-report.json --trace kiln-trace.json

test: install-test
	$(PY) -m pytest
