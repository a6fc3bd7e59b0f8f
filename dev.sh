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
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, exactly: the CPU wheel on this machine; any other torch pulls a CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[cpu,dev]"
  # pip drags in CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` on CPU.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
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
