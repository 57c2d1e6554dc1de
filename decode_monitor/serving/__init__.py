"""Request handling between the ROS node and the engine: parsing, queueing, streaming (no ROS)."""
