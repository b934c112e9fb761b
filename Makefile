# Two entry points: `make study` (the default study, end to end) and `make test` (the test suite).
# Both create .venv in the project root and install the project into it first.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
CORES ?= 8

.PHONY: study test test-e2e test-slurm install lint benchmark pull ui clean

# Room on the project's disk, checked before the work that fills it: pip, DVC and the stages stop on a full disk
# half-way, with a bare "[Errno 28] No space left on device". The environment takes 2.2 GiB (pip's downloads beside
# it while installing); a default study 1.9 GiB more (results/ 1.0, the DVC cache 0.9).
need_gib = @free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(1) ]; then \
	    echo "$(2) needs about $(1) GiB free on the disk of $(CURDIR); it has $$free GiB" >&2; exit 1; fi

$(VENV)/.installed: pyproject.toml
	$(call need_gib,3,installing the environment)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	# torch first and pinned: plain `torch` would pull the CUDA build.
	$(PYTHON) -m pip install --quiet --no-compile --upgrade pip
	$(PYTHON) -m pip install --quiet --no-compile torch==2.13.0 ninja numpy
	# The sparse FFN's C++ kernel (execution/cpu_kernel.py) is built for this CPU on the other core while pip
	# installs the rest: else the benchmark stage builds it, alone on the machine at the end of a fresh clone's
	# study (26 s; benchmarks/install.py). It needs torch and ninja (numpy only to spare torch's warning at import);
	# best effort, as at first use.
	PYTHONPATH=src $(PYTHON) -m detr_sparsity.execution.cpu_kernel & kernel=$$!; \
	    $(PYTHON) -m pip install --quiet --no-compile -e '.[test]' && wait $$kernel
	# Byte-compiled on every core instead of by pip, one file at a time (benchmarks/install.py); best effort, as
	# pip's: a file that does not compile (torch ships one in Python 3.12 syntax) is left to the interpreter.
	$(PYTHON) -c 'import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path("purelib"), quiet=2, workers=0)'
	touch $@

install: $(VENV)/.installed

study: install
	$(call need_gib,2,the default study)
	snakemake --cores $(CORES)

# All but the end-to-end runs of minutes each (marker slow) and the SLURM tests: under 10 minutes.
test: install
	$(PYTHON) -m pytest -q

# The end-to-end runs: the tiny study under the real Snakemake and DVC (its reruns, sharding, a DVC clone), the
# full-size DETR-R50 profile, SIBS and MGS stages, the ONNX export; about 20 minutes on 2 cores.
test-e2e: install
	$(PYTHON) -m pytest -q -m slow

# The tiny study through a single-node SLURM cluster on this machine (root; Debian's SLURM, installed by
# `bash workflow/profiles/slurm/local-cluster.sh install`): about half an hour on 2 cores, skipped without SLURM.
test-slurm: install
	$(PYTHON) -m pytest -q -m slurm tests/test_slurm_cluster.py

lint: install
	snakemake --lint

# Measurements on the default study's outputs (run `make study` first); JSON under results/<study>/benchmark/.
benchmark: install
	$(PYTHON) benchmarks/profiling_overhead.py --repeats 7
	$(PYTHON) benchmarks/gate_training_cache.py --repeats 5
	$(PYTHON) benchmarks/gate_training_cost.py --repeats 3
	$(PYTHON) benchmarks/bootstrap_cost.py --repeats 3
	$(PYTHON) benchmarks/flop_count.py --repeats 3
	$(PYTHON) benchmarks/kernel_tile.py --repeats 11
	$(PYTHON) benchmarks/kernel_v2.py --repeats 11
	$(PYTHON) benchmarks/kernel_isa.py --repeats 11

# A clone of a study someone pushed to the DVC remote: `dvc pull`, and once `dvc status` confirms that every stage
# matches dvc.lock, `snakemake --touch` so that Snakemake sees the pulled outputs as up to date too.
pull: install
	$(PYTHON) -m detr_sparsity.sharing

# The MLflow UI on the study's runs: starts `mlflow ui` on the project's store (MLFLOW_TRACKING_URI, default
# sqlite:///mlflow.db) on 127.0.0.1 and prints the URL of the study experiment's run table (MLflow 3 would otherwise
# open on an empty GenAI traces page). UI_PORT=5001 make ui for another port.
UI_PORT ?= 5000
ui: install
	$(PYTHON) -m detr_sparsity.ui --port $(UI_PORT)

clean:
	rm -rf results .snakemake mlflow.db mlruns mlartifacts
