"""The llm_decoder node: requests in; streamed tokens, one response each and diagnostics out.

Decoding runs on the service's worker thread, so subscriptions and the diagnostics timer never
wait for the GPU.
"""
import dataclasses
import json
import sys

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float32, String

from decode_monitor.engine.factory import build_decoder
from decode_monitor.engine.floor import measure_copy_bandwidth
from decode_monitor.node.diagnostics import build_array
from decode_monitor.node.parameters import declare_and_read, ParameterError
from decode_monitor.serving.service import DecodeService
from decode_monitor.telemetry.gpu import GpuTelemetry


class LlmDecoderNode(Node):
    def __init__(self):
        super().__init__('llm_decoder')
        self.config = declare_and_read(self)  # raises ParameterError on a bad value
        c = self.config
        reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self._stream_pub = self.create_publisher(String, 'stream', reliable)
        self._response_pub = self.create_publisher(String, 'response', reliable)
        self._latency_pub = self.create_publisher(Float32, 'step_latency', 100)
        diag_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._diag_pubs = [self.create_publisher(DiagnosticArray, 'diagnostics', diag_qos)]
        if c.mirror_diagnostics:  # the global topic diagnostic_aggregator listens on
            self._diag_pubs.append(self.create_publisher(DiagnosticArray, '/diagnostics',
                                                         diag_qos))
        self.gpu = GpuTelemetry(c.gpu_index)
        self.info = dict(model=c.settings.model, mode_requested=c.settings.mode,
                         queue_size=c.queue_size, peak_source='loading')
        self.service = DecodeService(
            self._load_decoder, self._publish_stream, self._publish_response,
            on_step=self._publish_latency, limits=c.limits, queue_size=c.queue_size,
            request_timeout_s=c.request_timeout_s, window=c.window_steps)
        self.create_subscription(String, 'request', lambda m: self.service.submit(m.data),
                                 reliable)
        self.create_subscription(String, 'cancel', lambda m: self.service.cancel(m.data),
                                 reliable)
        self.create_timer(c.diagnostics_period, self._publish_diagnostics)
        self.service.start()
        self.get_logger().info(
            f'loading {c.settings.model} (device {c.settings.device}, mode {c.settings.mode}, '
            f'backend {c.settings.backend}); requests on {self.resolve_topic_name("request")}')

    def _load_decoder(self):
        decoder = build_decoder(self.config.settings)
        measured = measure_copy_bandwidth(decoder.device)
        if self.config.bandwidth_override_gbps > 0:
            peak, source = self.config.bandwidth_override_gbps * 1e9, 'parameter'
        elif self.gpu.available and self.gpu.peak_bandwidth and decoder.device.type == 'cuda':
            peak, source = self.gpu.peak_bandwidth, 'NVML'
        else:
            peak, source = None, 'unavailable (no NVML); fractions use measured bandwidth'
        self.info.update(
            model=decoder.loaded.name, dtype=str(decoder.loaded.model.dtype).replace('torch.', ''),
            backend=decoder.backend.name, weights=decoder.weights, mode=decoder.mode,
            graph_fallbacks=decoder.graph_fallbacks,
            fallback_reason=decoder.fallback_reason, peak_bandwidth=peak, peak_source=source,
            measured_bandwidth=measured)
        if decoder.fallback_reason:
            self.get_logger().warning(decoder.fallback_reason)
        self.get_logger().info(
            f'ready: {decoder.loaded.name} on {decoder.device}, {decoder.mode} mode, '
            f'{decoder.backend.name} backend, {decoder.weights} weights, '
            f'max_context {decoder.max_context}')
        return decoder

    def _publish_stream(self, request_id, index, text):
        self._stream_pub.publish(String(data=json.dumps(
            {'id': request_id, 'index': index, 'text': text}, ensure_ascii=False)))

    def _publish_response(self, body):
        self._response_pub.publish(String(data=body))

    def _publish_latency(self, step_ms):
        self._latency_pub.publish(Float32(data=float(step_ms)))

    def _publish_diagnostics(self):
        peak = self.info.get('peak_bandwidth')
        measured = self.info.get('measured_bandwidth')
        stats = self.service.window.stats(peak or measured, measured) if measured else None
        if stats is not None and peak is None:
            stats = dataclasses.replace(stats, fraction_of_peak=None)
        array = build_array(self.get_clock().now().to_msg(), self.service.snapshot(), stats,
                            self.info, self.gpu, self.gpu.sample(), self.config.thresholds)
        for pub in self._diag_pubs:
            pub.publish(array)

    def destroy_node(self):
        self.service.stop()
        return super().destroy_node()


def main(args=None):
    try:
        with rclpy.init(args=args):
            try:
                node = LlmDecoderNode()
            except ParameterError as exc:
                print(f'llm_decoder: {exc}', file=sys.stderr)
                return 2
            try:
                rclpy.spin(node)
            finally:
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
