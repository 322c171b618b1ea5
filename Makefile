# Two commands (README quick start):  make demo   and   make test
# Both create .venv on first use: torch (CPU wheel) first, then everything else
# under constraints.txt so no CUDA wheels are pulled (SPEC section 11).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.medxfer-installed
OUT    ?= runs/demo

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medxfer demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# GPU check (scripts/gpu_check.py, bundles/msd_seg3d/docs/README.md "GPU check"). gpu-check-prepare:
# the lent GPU machine's missing wheels + GPU-sized data into .gpu-check/ (needs PyPI); there, with
# .gpu-check carried: python3 scripts/gpu_check.py device. gpu-check: the whole check here, CPU, tiny.
.PHONY: gpu-check gpu-check-prepare
gpu-check-prepare: $(STAMP)
	$(BIN)/python scripts/gpu_check.py prepare

gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py run --device cpu --tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
