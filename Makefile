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

# oneDNN's headers and library (Debian's libdnnl-dev), for the CPU convolutions of train/train_dir/onednn_conv.cc:
# installed where apt-get works (as root); elsewhere training uses MindSpore's convolutions and says so.
$(STAMP): requirements.txt
	@[ -e /usr/include/oneapi/dnnl/dnnl.hpp ] || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -qq libdnnl-dev >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq libdnnl-dev >/dev/null) || \
		echo "note: libdnnl-dev did not install: CPU training will use MindSpore's convolutions"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train/make_demo_data.py --out $(DEMO_DATA)
	$(PY) train/train_dir/train.py --data_url $(DEMO_DATA)/cifar-10-batches-bin --output_url $(DEMO_OUTPUT) \
		--experiment demo-shapes --image_size 32 --batch_size 32 --epochs 8 --lr 0.01 --warmup_epochs 1 --overwrite

# Two workers, each taking whole test files (module fixtures train once): a single pytest process keeps only one
# of the two cores busy for half of the run (compiling graphs, starting interpreters, waiting on servers). Files go
# out longest first (tests/conftest.py FILE_MINUTES), not by xdist's count of tests.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# Needs the network: resolves the training job's and the inference pod's requirement files for Python 3.9 (x86_64
# and aarch64, wheels only), runs the job and the app in Python 3.9 venvs built from them, and runs the job on an
# emulated arm64 Debian with Python 3.9 (qemu user mode over a root extracted from Debian's packages), without aim,
# then replays its series into a local Aim repo. Installs qemu-user-static and mmdebstrap with apt-get when missing.
ARM64_ROOT := .cache/arm64-bullseye
# This machine's own Debian mirror (bullseye, with Python 3.9, is no longer on its security mirror).
DEBIAN_MIRROR ?= $(shell sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
check-cloud: $(STAMP) $(ARM64_ROOT)/usr/bin/python3.9
	RUN_NETWORK_TESTS=1 ARM64_ROOT=$(ARM64_ROOT) $(PY) -m pytest tests/test_cloud_requirements.py

$(ARM64_ROOT)/usr/bin/python3.9:
	command -v qemu-aarch64-static >/dev/null && command -v mmdebstrap >/dev/null || \
		(apt-get update && apt-get install -y qemu-user-static mmdebstrap)
	rm -rf $(ARM64_ROOT) && mkdir -p $(dir $(ARM64_ROOT))
	mmdebstrap --variant=extract --arch=arm64 \
		--include=python3.9,libpython3.9-stdlib,python3-distutils,libgomp1,libstdc++6 bullseye $(ARM64_ROOT) \
		$(DEBIAN_MIRROR)

# Speed against the seed tutorial's loop and PyTorch (in requirements.txt for the tests), ~8 min on 2 cores.
bench: $(STAMP)
	$(PY) bench/speed.py --rounds 3

clean:
	rm -rf demo .pytest_cache
