#!/usr/bin/env bash
# Set up (first run only), then start the llm_decoder node on the embedded SmolLM2, ask it a few
# questions over ROS 2 topics, stream the answers and print its diagnostics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/demo "$@"
