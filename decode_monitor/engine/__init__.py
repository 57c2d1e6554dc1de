"""The engine: torch and transformers only, never ROS."""
