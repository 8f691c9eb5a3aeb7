# ltssl: the two commands a researcher needs are `make sweep` and `make test`.
PY := .venv/bin/python

.PHONY: install sweep test test-fast cluster-up cluster-down bench clean

install:            ## create .venv and install everything (apt packages included); seconds when done
	@bash scripts/install.sh

sweep: install      ## the embedded default: a small rwSAM sweep on long-tailed digits, run locally
	$(PY) launch/sweep.py

test: install       ## bring up the local Slurm cluster(s), run the whole test suite, tear down
	@bash scripts/test.sh

test-fast: install  ## the tests that need no Slurm cluster
	$(PY) -m pytest -m "not slurm and not two_nodes" -q

cluster-up: install
	slurm/local-cluster up
cluster-down:
	slurm/local-cluster down

bench: install      ## every benchmark, one command each, figures into benchmarks/results/*.json
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/step.py
	$(PY) benchmarks/multiview.py
	$(PY) benchmarks/launch.py
	$(PY) benchmarks/multinode.py
	$(PY) benchmarks/sweep_overhead.py
	$(PY) benchmarks/sweep_scale.py
	@if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then $(PY) benchmarks/gpu.py; \
	else echo "bench: no CUDA device here; benchmarks/gpu.py is the device check for a GPU machine (README, Benchmarks)"; fi

clean:
	rm -rf .venv .pytest_cache data results
