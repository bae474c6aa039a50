# internlm-kit developer and user entry points. `make setup`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The dev environment's torch: on these CPU machines 2.13.0 is the CPU build already on disk.
TORCH  ?= torch==2.13.0
PROFILE ?=
MODEL  ?=
PYTEST_ARGS ?=
# More options for `make chat` / `make serve`, e.g. ARGS="--port 8001".
ARGS ?=

# No PROFILE on a machine with an NVIDIA driver: `internlm-kit install` picks the profile whose torch
# CUDA build that driver runs (PyPI's default torch is built for a newer CUDA than a 12.2 driver
# runs). PROFILE=dev keeps the developers' stack (TORCH above) on such a machine too.
ifeq ($(strip $(PROFILE)),)
  ifneq ($(shell nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null),)
    PROFILE := auto
  endif
endif
ifeq ($(strip $(PROFILE)),dev)
  override PROFILE :=
endif
# --profile for install and doctor: none when the kit chooses.
PROFILE_ARG := $(if $(filter-out auto,$(strip $(PROFILE))),--profile $(strip $(PROFILE)),)

.PHONY: setup test test-fast chat serve doctor bench clean chromium

# The stamp holds the profile the venv was set up with: naming another one on an existing venv
# installs it there (snapshotted, so `internlm-kit install --rollback` undoes it). A named profile
# is also installed whenever the venv no longer has its pins (after `install --rollback`, say):
# the stamp alone would say it is already there.
setup: $(VENV)/.installed chromium
ifneq ($(strip $(PROFILE)),)
	@if [ "$$(cat $(VENV)/.installed)" != "$(strip $(PROFILE))" ] \
	  || { [ "$(strip $(PROFILE))" != auto ] \
	       && ! $(BIN)/python -m setup_kit.profiles "$(strip $(PROFILE))" 2>/dev/null; }; then \
	  $(BIN)/internlm-kit install $(PROFILE_ARG) --python $(BIN)/python --yes \
	  && $(BIN)/python -m pip install -q -e ".[chat,serve,test]" \
	  && echo "$(strip $(PROFILE))" > $(VENV)/.installed; \
	fi
endif
	@echo "--- internlm-kit doctor (what this machine can and cannot do) ---"
	@$(BIN)/internlm-kit doctor $(PROFILE_ARG) \
	  || echo "(the doctor found problems: each one above has its fix)"

# The chat page's browser tests drive Debian's Chromium (no browser download). Installed as root or
# with `sudo -n` (never a password prompt); otherwise the tests say they were skipped and why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=no; fi; \
	  if [ "$$SUDO" != no ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "--- installing Debian's chromium (for the chat page's browser tests) ---"; \
	    $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium \
	      || echo "(chromium could not be installed: the browser tests will be skipped)"; \
	  else echo "(no chromium, and no root or passwordless sudo to install it: the browser tests will be skipped;" \
	    "install it with: sudo apt-get install -y chromium)"; fi; }

# With PROFILE, torch and the model stack come from the profile (resolved first, snapshotted), so
# no other torch is installed before it; the kit's `chat` extra is added after, already satisfied.
# Every target that needs the environment (setup, test, chat, serve, doctor) depends on this one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(strip $(PROFILE)),)
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m setup_kit.profiles cpu --constraints > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -e ".[chat,serve,test]" -c $(VENV)/constraints.txt
else
	$(BIN)/python -m pip install -e ".[serve,test]"
	$(BIN)/internlm-kit install $(PROFILE_ARG) --python $(BIN)/python --yes
	$(BIN)/python -m pip install -e ".[chat,serve,test]"
endif
	echo "$(strip $(PROFILE))" > $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the tests that build venvs or install packages.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

doctor: $(VENV)/.installed
	$(BIN)/internlm-kit doctor $(if $(MODEL),--model $(MODEL),)

# From a clean clone to a chat: set up when needed (the .venv prerequisite), fetch the model when
# it is not complete on disk (MODEL= a hub name or a folder; default internlm/internlm2-chat-1_8b),
# then chat, which runs the doctor's pre-flight checks before loading anything. The kit runs as the
# terminal's foreground (setup_kit/makerun.py): Ctrl-C reaches it alone, and make ends as the kit ends.
chat: $(VENV)/.installed
	@dir=$$($(BIN)/python -c "$$CHAT_MODEL_DIR" "$(MODEL)") || exit 1; \
	case "$$dir" in fetch:*) dir=$${dir#fetch:}; \
	  $(BIN)/internlm-kit download $(MODEL) --local-dir "$$dir" || exit 1;; esac; \
	exec $(BIN)/python -m setup_kit.makerun $(BIN)/internlm-kit chat --model "$$dir" $(ARGS)

# The folder MODEL resolves to, prefixed "fetch:" when it is missing or incomplete.
define CHAT_MODEL_DIR
import sys
from setup_kit.engines.select import resolve_model_dir
from setup_kit.modelfolder import inspect_model_folder
folder = resolve_model_dir(sys.argv[1] or None)
print(("" if inspect_model_folder(folder).ok else "fetch:") + str(folder))
endef
export CHAT_MODEL_DIR

# The same, serving the model behind the OpenAI-compatible API and the chat page.
serve: $(VENV)/.installed
	@dir=$$($(BIN)/python -c "$$CHAT_MODEL_DIR" "$(MODEL)") || exit 1; \
	case "$$dir" in fetch:*) dir=$${dir#fetch:}; \
	  $(BIN)/internlm-kit download $(MODEL) --local-dir "$$dir" || exit 1;; esac; \
	exec $(BIN)/python -m setup_kit.makerun $(BIN)/internlm-kit serve --model "$(or $(MODEL),internlm/internlm2-chat-1_8b)" $(ARGS)

bench: $(VENV)/.installed
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
