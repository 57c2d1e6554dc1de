"""Wrap the diagnostics report into a diagnostic_msgs/DiagnosticArray (diagnostic_updater style).

Pure message building, so tests construct arrays with no ROS graph.
"""
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from decode_monitor.telemetry.report import PREFIX, statuses


def build_array(stamp, snapshot, stats, info, gpu, gpu_sample, thresholds, prefix=PREFIX,
                device=None, live=None):
    """stamp: builtin_interfaces/Time; the rest as telemetry.report.statuses takes them."""
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [
        DiagnosticStatus(level=bytes([level]), name=name, message=message,
                         hardware_id=hardware_id,
                         values=[KeyValue(key=k, value=v) for k, v in values])
        for name, level, message, hardware_id, values in statuses(
            snapshot, stats, info, gpu, gpu_sample, thresholds, prefix, device=device,
            live=live)]
    return array
