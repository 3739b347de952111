# Two commands on a fresh machine (Python + pip; uv is installed with pip when missing):
#   make demo   - syncs the workspace and runs the GRPO demo loop on FakeStrategy
#   make test   - runs every package's tests, each in its own environment with only its dependencies
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: uv demo demo-fsdp demo-deepspeed test check-wheels lint

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q "uv>=0.5"

demo: uv
	$(UV) run python examples/grpo_demo.py --strategy fake

demo-fsdp: uv
	$(UV) run torchrun --standalone --nproc-per-node 2 examples/grpo_demo.py --strategy fsdp

demo-deepspeed: uv
	$(UV) run torchrun --standalone --nproc-per-node 2 examples/grpo_demo.py --strategy deepspeed --zero_stage 2

# One or more cells of CI's matrix: make test PACKAGES=lightrft-config PYTHON=3.10 RESOLUTION=lowest-direct
test: uv
	UV="$(UV)" bash scripts/test-packages $(if $(PYTHON),--python $(PYTHON)) \
		$(if $(RESOLUTION),--resolution $(RESOLUTION)) $(PACKAGES)

# Builds every wheel and installs each package alone from them in a clean venv.
check-wheels: uv
	UV="$(UV)" bash scripts/check-wheels

lint: uv
	$(UV) run ruff check packages examples benchmarks
	$(UV) run ruff format --check packages examples benchmarks
