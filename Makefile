# Ferry's entry points. Every target is idempotent and safe on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := gcc-riscv64-unknown-elf binutils-riscv64-unknown-elf picolibc-riscv64-unknown-elf \
                qemu-system-misc opensbi device-tree-compiler

.PHONY: all venv deps protos guests guests-check lint test bench demo clean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

deps:
	@bash deploy/install-deps.sh $(DEB_PACKAGES)

protos: venv
	$(PY) -m protos.generate

guests: deps
	$(MAKE) -C guests

lint: venv
	$(VENV)/bin/ruff check vmcore node coordinator deploy protos tests bench
	$(VENV)/bin/mypy

test: venv deps
	$(MAKE) lint
	$(VENV)/bin/pytest -q

bench: venv deps
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: venv deps
	$(PY) -m deploy.demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# A minimal Linux guest (issue 9): it takes minutes to build, so it is not part
# of `make guests`. Checks the rebuilt Image against guests/build/linux/SHA256SUMS.
LINUX_DEB_PACKAGES := linux-source-6.1 gcc-riscv64-linux-gnu flex bison bc cpio libelf-dev gcc libc6-dev
.PHONY: guests-linux
guests-linux:
	@bash deploy/install-deps.sh $(LINUX_DEB_PACKAGES)
	bash guests/linux/build.sh
