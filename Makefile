# The two set-up commands of the README: `make demo` and `make test`. Both install what they
# need first (apt packages, a venv in .venv) and must run as root on Debian 12.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup:
	./scripts/setup-dev.sh

demo: setup
	$(PY) -m libvirt_bpfcg.demo

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check libvirt_bpfcg tests bench hooks

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
