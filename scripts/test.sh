#!/usr/bin/env bash
# Set up (first run only), then run the whole test suite on the CPU against ROS 2 Kilted, and
# the tests that start the node or talk ROS once more against ROS 2 Jazzy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup.sh jazzy
# Test traffic stays on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
ROS_TESTS=(test/test_node_e2e.py test/test_node_shutdown.py test/test_node_lifecycle.py
           test/test_parameters.py test/test_diagnostics_msg.py test/test_clients.py
           test/test_node_prompt_cache.py)
# Two processes, each taking whole files (module-scoped fixtures such as a node stay shared
# within a file); ROS_DOMAIN_ID differs per process (conftest.py). `-n 0` runs in one.
PARALLEL=(-n 2 --dist loadfile)
.venv/bin/python -m pytest -q "${PARALLEL[@]}" test "$@"
[ $# -gt 0 ] && exit 0  # a selection runs on Kilted only
echo "--- the ROS tests again, on ROS 2 Jazzy (rclpy $(.venv-jazzy/bin/python -c \
  'import importlib.metadata as m; print(m.version("ros-jazzy-rclpy"))'))"
.venv-jazzy/bin/python -m pytest -q "${PARALLEL[@]}" "${ROS_TESTS[@]}"
