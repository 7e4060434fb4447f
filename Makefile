# The two set-up commands of the README: `make demo` and `make test`. Both install what they
# need first (apt packages, a venv in .venv) and must run as root on Debian 12.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean deb rpm man completion

setup:
	./scripts/setup-dev.sh

demo: setup
	$(PY) scripts/demo.py

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check libvirt_bpfcg tests bench hooks scripts stress

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# Issue 7's long runs (docs/reliability.md): the crash, concurrency, limits and fuzz tests at
# full scale (1,000 random kills, 100,000 fuzzed documents …); CI runs them shortened.
.PHONY: stress
stress: setup
	$(PY) -m stress

# Packages and generated docs (README "Packages"): built from this checkout into dist/.
deb:
	./packaging/build-deb.sh

rpm:
	./packaging/build-rpm.sh

man:
	mkdir -p dist && /usr/bin/python3 -m libvirt_bpfcg.manpage > dist/libvirt-bpfcg.8.tmp && \
		mv dist/libvirt-bpfcg.8.tmp dist/libvirt-bpfcg.8

completion:
	mkdir -p dist && /usr/bin/python3 -m libvirt_bpfcg.completion > dist/libvirt-bpfcg.bash.tmp && \
		mv dist/libvirt-bpfcg.bash.tmp dist/libvirt-bpfcg.bash

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
