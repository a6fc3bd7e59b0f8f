#!/usr/bin/env bash
# The GPU checks (tests/test_gpu.py: RM training in process and under Ray Train, learner, reference
# policy and RM scorer on CUDA, each against the CPU) on a GPU machine that has torch and
# transformers but no Ray: run from the repo root after building the Ray bundle here with
# ../shared/tools/device-ray-bundle.sh (it writes .devbundle/ray.tar.xz), e.g. on the lent device:
#   bash benchmarks/gpu_check.sh          (carry .devbundle)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/site && tar xJf .devbundle/ray.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
exec python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py "$@"
