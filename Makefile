# Two commands on a fresh machine (Python + pip; uv is installed with pip when missing):
#   make demo   - syncs the workspace and runs `lightrft-demo` (GRPO on FakeStrategy, HF engine)
#   make test   - runs every package's tests, each in its own environment with only its dependencies
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: uv demo demo-fsdp demo-deepspeed test lint

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

test: uv
	UV="$(UV)" bash scripts/test-packages

lint: uv
	$(UV) run ruff check packages examples benchmarks
	$(UV) run ruff format --check packages examples benchmarks
