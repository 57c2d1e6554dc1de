"""The offline bench: grid replay of batch-1 decode in fresh processes, statistics, report,
plots and a hardware-qualification verdict. Uses the engine and telemetry, never ROS."""
