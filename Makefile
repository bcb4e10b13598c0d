# The few commands people type. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch build to install before everything else. The default is the CPU wheel;
# on a GPU box pick a CUDA build, e.g.
#   make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" run
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install run test test-slow bench bench-gpu gpu-wheels lint doctor clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/stickerbot run

doctor: install
	$(VENV)/bin/stickerbot doctor

# pytest exits 5 when it collected no test; that is not a failure of the product.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

bench: install
	$(PY) -m benchmarks

# Every GPU figure in one offline command (benchmarks/README.md); exit 3 where no CUDA GPU is.
bench-gpu: install
	$(PY) -m benchmarks gpu $(BENCH_ARGS)

# The wheels that take this project to a GPU machine with no network (benchmarks/README.md).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r benchmarks/gpu-wheels.txt

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pipeline bot segmentation

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
