# The two commands in README.md are `make demo` and `make test`.
# Both create ./.venv on first use (CPU torch pinned), so a fresh clone needs
# nothing but python3 (3.10+) and make.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build that lies on this kind of machine; GPU users: see README.
TORCH_SPEC ?= torch==2.13.0
CORES  ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo test jsrt clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/snakemake --profile workflow/profiles/default --cores $(CORES)
	$(BIN)/snakemake --profile workflow/profiles/default --cores $(CORES) --report results/phantoms/report.html

# The GPU recipe (config/jsrt.yaml) where CUDA works, else the CPU recipe
# (config/jsrt-cpu.yaml); JSRT_CONFIG=... picks one explicitly.
JSRT_DATA ?= $(abspath ../shared/data/jsrt-scr-fold1)

jsrt: setup
	$(eval JSRT_CONFIG ?= $(shell $(BIN)/python -c "import torch; print('config/jsrt.yaml' if torch.cuda.is_available() else 'config/jsrt-cpu.yaml')"))
	@echo "JSRT recipe: $(JSRT_CONFIG)"
	$(BIN)/snakemake --profile workflow/profiles/default --cores $(CORES) \
	    --configfile $(JSRT_CONFIG) --config data_root=$(JSRT_DATA)

# Two pytest-xdist workers: the suite waits on services, SLURM and
# subprocesses for much of its time (tests/conftest.py groups the tests).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf results logs .snakemake
