# The two set-up commands: `make demo` and `make test`. Both install everything
# they need into .venv first (idempotent: a stamp file records the install).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.daco-installed

.PHONY: install test-deps wordnet fonts chromium demo test test-fast test-latest lock bench gpu-check gpu-check-wheels gpu-check-imports clean

# what the pipeline and the library need
install: $(STAMP) wordnet

# what only the tests need besides: FigStep's font, Chromium for the report test
test-deps: fonts chromium

# Installs come from the committed lock (requirements.lock): a fresh machine gets
# exactly the set the suite passed with. `make lock` refreshes it deliberately.
# A new venv takes about 7.1 GiB (torch 2.14.1's CUDA build is 5.5 of it): checked first, so a full
# disk is named before pip starts rather than failing half-way with "No space left on device".
VENV_MIB := 7400
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || { mkdir -p "$(dir $(abspath $(VENV)))"; \
	  free=$$(df -Pk "$(dir $(abspath $(VENV)))" | awk 'NR==2 {print int($$4 / 1024)}'); \
	  [ "$$free" -ge $(VENV_MIB) ] || { echo "make install: $$free MiB free under $(dir $(abspath $(VENV))); the locked set needs about $(VENV_MIB) MiB for $(VENV) (torch's CUDA build). Free disk space, or put the venv elsewhere: make VENV=/path/with/space/venv ..." >&2; exit 1; }; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -r requirements.lock
	$(PY) -m pip install -q --no-cache-dir --no-deps -e .
	touch $(STAMP)

# Recompile requirements.lock from pyproject's ranges (uv pip compile, Linux x86-64,
# Python 3.11); torch/torchvision stay at the wheels named in constraints.txt.
UV_VENV := /tmp/daco-uv
lock:
	test -x $(UV_VENV)/bin/uv || { $(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q uv; }
	$(UV_VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -c constraints.txt --index-url https://pypi.org/simple \
	  --no-header --annotation-style line -o requirements.lock

# The suite on the newest release of every dependency (not part of CI): a throwaway
# venv, torch/torchvision at the pinned wheels, everything else --upgrade'd.
LATEST_VENV := /tmp/daco-latest-venv
test-latest: test-deps wordnet
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' -c constraints.txt
	$(LATEST_VENV)/bin/pip freeze | grep -iE '^(transformers|apache-beam|numpy|open.clip.torch|faiss-cpu|pyarrow|torch)==' 
	$(LATEST_VENV)/bin/python -m pytest -q

# WordNet 3.0: NLTK's data, $$WNSEARCHDIR or /usr/share/wordnet. When none is
# found and apt is usable, install Debian's copy.
wordnet: $(STAMP)
	@$(PY) -c "from transforms.wordnet import find_wordnet; find_wordnet()" 2>/dev/null \
	  || { if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	         echo "installing WordNet 3.0 (wordnet-base, wordnet-sense-index)"; \
	         apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null && apt-get clean; \
	       else \
	         $(PY) -c "from transforms.wordnet import find_wordnet; find_wordnet()"; \
	       fi; }

# FreeMonoBold (GNU FreeFont), the font FigStep draws its typographic images with
# (steering/eval/benchmarks.py). When absent and apt is usable, install Debian's copy;
# otherwise FigStep images are drawn with matplotlib's DejaVu Sans Mono Bold (same layout, other glyphs).
fonts: $(STAMP)
	@$(PY) -c "from PIL import ImageFont; ImageFont.truetype('FreeMonoBold.ttf', 10)" 2>/dev/null \
	  || { if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	         echo "installing FreeMonoBold (fonts-freefont-ttf)"; \
	         apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-freefont-ttf >/dev/null && apt-get clean; \
	       else \
	         echo "FreeMonoBold.ttf not found: FigStep images fall back to DejaVu Sans Mono Bold (apt-get install fonts-freefont-ttf)"; \
	       fi; }

# Debian's chromium renders `daco report`'s HTML in tests/test_report.py (headless, offline);
# installed when missing and apt is usable, otherwise those tests skip.
chromium:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
	  || { echo "installing chromium (headless report tests)"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && apt-get clean; }

demo: install
	$(VENV)/bin/daco build --out daco-out
	$(VENV)/bin/daco report daco-out

test: install test-deps
	$(PY) -m pytest -q

# the inner loop: everything but the full-build and real-img2dataset tests (CI runs them all)
test-fast: install test-deps
	$(PY) -m pytest -q -m "not slow"

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# The prepared GPU check (bench/gpu_check.py, docs/gpu-check.md): on the GPU machine, with the
# wheels below carried as .whl/ (the script installs them). Versions are requirements.lock's.
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) bench/gpu_check.py

# Wheels the GPU machine lacks (it has torch, transformers, timm, pandas, pyarrow, grpcio, ...):
# open_clip, and apache-beam with the dependencies its import needs there (`make gpu-check-imports`
# checks the list against bench/gpu_machine_packages.txt). x86-64 CPython 3.12.
GPU_CHECK_WHEELS := apache-beam==2.77.0 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 proto-plus==1.29.0 \
	fastavro==1.13.1 beartype==0.22.9 httplib2==0.32.1 zstandard==0.25.0 jsonpickle==4.1.4 fasteners==0.20 \
	objsize==0.7.1 cryptography==50.0.2 cffi==2.1.1 pytz==2026.6
gpu-check-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_CHECK_WHEELS)
	@du -ch .whl/*.whl | tail -1 | sed 's/total/in .whl: carry ".whl" (64 MiB per call, working tree included)/'

# Here: the smoke check with only the GPU machine's packages and the wheels above importable.
gpu-check-imports: install
	$(PY) bench/gpu_check_imports.py --carry "$(GPU_CHECK_WHEELS)"

clean:
	rm -rf daco-out .pytest_cache
