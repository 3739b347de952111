# Source this ON THE GPU MACHINE (device `run`, with carry [".whl"]):  source scripts/gpu-env.sh
# Installs the carried wheels into /tmp/site and sets the environment the device README asks for.
rm -rf /tmp/site  # a warm machine keeps the last call's install: never test stale wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl/lightrft/*.whl
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
