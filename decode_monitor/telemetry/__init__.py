"""Pure-Python telemetry: latency windows, GPU readings, health levels (no torch, no ROS)."""
