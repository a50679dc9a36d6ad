# The two set-up commands of the README: `make warmup` (the main job) and `make test`.
# Both install what they need on a fresh machine. On a machine without torch, the CPU build
# torch==2.13.0 is installed first (an unpinned torch would pull a multi-GB CUDA build).
PY ?= python3

.PHONY: install test warmup

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

test: install
	$(PY) -m pytest

warmup: install
	$(PY) -m orchestrator.cli config show
	$(PY) -m orchestrator.cli config hash
