#!/usr/bin/env bash
# The GPU checks, tests/test_gpu.py (RM training in process and under Ray Train, learner, reference
# policy, RM scorer and a CUDA learner's shared-memory write, each against the CPU) and a learner group
# of one rank over NCCL (ddp and fsdp) against the plain learner, run from the repo root on a GPU
# machine with torch and transformers:  bash benchmarks/gpu_check.sh
# Where Ray is not installed it is unpacked from .devbundle/ray.tar.xz (a Ray 2.60 wheel bundle for
# the image's Python; the developers' tools build it as ../shared/tools/device-ray-bundle.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/site && tar xJf .devbundle/ray.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
exec python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
  "tests/test_learner_group.py::test_a_group_of_one_rank_steps_as_the_single_learner" "$@"
