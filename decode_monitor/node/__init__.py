"""The ROS 2 layer: parameters, topics, diagnostics. The only place rclpy is imported."""
