# Two commands on a fresh clone: `make demo` (train offline on generated data) and `make test`.
# Each target creates a git-ignored venv in .venv and installs the pinned requirements.txt into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
DEMO_DATA := demo/data
DEMO_OUTPUT := demo/output

.PHONY: demo test test-fast check-cloud bench venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train/make_demo_data.py --out $(DEMO_DATA)
	$(PY) train/train_dir/train.py --data_url $(DEMO_DATA)/cifar-10-batches-bin --output_url $(DEMO_OUTPUT) \
		--experiment demo-shapes --image_size 32 --batch_size 32 --epochs 8 --lr 0.01 --warmup_epochs 1 --overwrite

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Needs the network: resolves the training job's and the inference pod's requirement files for Python 3.9, then runs
# the job (with aim 3.8.1, read back by its own `aim up`) and the app in Python 3.9 venvs built from them.
check-cloud: $(STAMP)
	RUN_NETWORK_TESTS=1 $(PY) -m pytest tests/test_cloud_requirements.py

# Speed against the seed tutorial's loop and PyTorch (CPU wheel, installed here only for this), ~8 min on 2 cores.
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) bench/speed.py --rounds 3

clean:
	rm -rf demo .pytest_cache
