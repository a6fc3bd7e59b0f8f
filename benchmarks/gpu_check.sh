#!/usr/bin/env bash
# The GPU checks, tests/test_gpu.py (RM training in process and under Ray Train, learner, reference
# policy, RM scorer and a CUDA learner's shared-memory write, each against the CPU) and a learner group
# of one rank over NCCL (ddp and fsdp) against the plain learner, run from the repo root on a GPU
# machine with torch and transformers:  bash benchmarks/gpu_check.sh
# Then (not with --tests-only) the learner benchmark on a ~0.5B Llama shape (Qwen2.5-0.5B's) in bfloat16
# autocast, 8 x 1024 tokens: tokens/s against the bfloat16 matmul peak measured in the same run, and
# the step's peak CUDA memory, whole logits against chunks of learner.logits_chunk_tokens' default.
# Where Ray is not installed it is unpacked from .devbundle/ray.tar.xz (a Ray 2.60 wheel bundle for
# the image's Python; the developers' tools build it as ../shared/tools/device-ray-bundle.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/site && tar xJf .devbundle/ray.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
bench=1
if [[ "${1:-}" == --tests-only ]]; then bench=0; shift; fi
status=0
python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
  "tests/test_learner_group.py::test_a_group_of_one_rank_steps_as_the_single_learner" "$@" || status=$?
if (( bench )); then
  python3 benchmarks/learner.py --batch 8 --seq 1024 --hidden 896 --layers 24 --heads 14 --kv-heads 2 \
    --intermediate 4864 --vocab 151936 --chunk 1024 || status=$?
fi
exit $status
