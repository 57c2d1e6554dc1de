"""The llm_decoder node: requests in; streamed tokens, one response each and diagnostics out.

A managed (lifecycle) node: configure loads the model and captures its graphs, activate
serves, deactivate answers what is pending with an error naming the state, cleanup frees the
model and its GPU memory, shutdown answers everything. With `autostart` (the default) it
configures and activates itself, and requests sent while the model loads wait in the queue.

Decoding runs on the service's worker thread and the lifecycle transitions on their own
callback group, so subscriptions and the diagnostics timer never wait for the GPU or a load.
SIGINT and SIGTERM stop intake, answer the running and every queued request ("the node is
shutting down"), wait (bounded) until subscribers have them, then exit 0.
"""
import dataclasses
import json
import os
import sys
import threading

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float32, String

from decode_monitor.engine.factory import build_decoder
from decode_monitor.engine.floor import measure_copy_bandwidth
from decode_monitor.node.diagnostics import build_array
from decode_monitor.node.parameters import check_update, declare_and_read, ParameterError
from decode_monitor.node.runtime import ros_session, route_python_logging, StopSignal
from decode_monitor.serving.service import DecodeService
from decode_monitor.telemetry.device import DeviceIdentity, select_telemetry
from decode_monitor.telemetry.live import LiveTelemetry

NAME = 'llm_decoder'
DELIVERY_TIMEOUT_S = 5.0  # how long shutdown waits for subscribers to acknowledge answers
INACTIVE = 'the node is inactive (lifecycle state inactive): activate it to serve'


class LlmDecoderNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__(NAME, **kwargs)
        self.config = declare_and_read(self)  # raises ParameterError on a bad value
        c = self.config
        route_python_logging(self.get_logger())
        reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self._stream_pub = self.create_publisher(String, 'stream', reliable)
        self._response_pub = self.create_publisher(String, 'response', reliable)
        self._latency_pub = self.create_publisher(Float32, 'step_latency', 100)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._info_pub = self.create_publisher(String, 'model_info', latched)
        diag_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._diag_pubs = [self.create_publisher(DiagnosticArray, 'diagnostics', diag_qos)]
        if c.mirror_diagnostics:  # the global topic diagnostic_aggregator listens on
            self._diag_pubs.append(self.create_publisher(DiagnosticArray, '/diagnostics',
                                                         diag_qos))
        self.gpu = select_telemetry(c.gpu_index)  # NVML, else a Jetson's sysfs, else none
        self.live = LiveTelemetry(self.gpu)
        self.device_identity = None  # the decoding device, once loaded
        self.info = dict(model=c.settings.model, mode_requested=c.settings.mode,
                         queue_size=c.queue_size, peak_source='loading')
        self.service = DecodeService(
            self._load_decoder, self._publish_stream, self._publish_response,
            on_step=self._publish_latency, limits=c.limits, queue_size=c.queue_size,
            request_timeout_s=c.request_timeout_s, window=c.window_steps,
            log_error=self.get_logger().error, system_prompt=c.system_prompt)
        self._io = ReentrantCallbackGroup()  # never blocked by a lifecycle transition
        self.create_subscription(String, 'request', lambda m: self.service.submit(m.data),
                                 reliable, callback_group=self._io)
        self.create_subscription(String, 'cancel', lambda m: self.service.cancel(m.data),
                                 reliable, callback_group=self._io)
        self._diag_timer = self.create_timer(c.diagnostics_period, self._publish_diagnostics,
                                             callback_group=self._io)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.finalized = threading.Event()
        self.service.start(serve=False)
        if c.autostart:
            self.service.activate()  # requests wait in the queue while the model loads
            self._autostart_timer = self.create_timer(
                0.0, self._autostart, callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(
            f'{"loading" if c.autostart else "waiting for configure:"} {c.settings.model} '
            f'(device {c.settings.device}, mode {c.settings.mode}, backend '
            f'{c.settings.backend}); requests on {self.resolve_topic_name("request")}')

    # -- lifecycle --------------------------------------------------------------------------
    def _autostart(self):
        self._autostart_timer.cancel()
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state):
        if self.service.configure(wait=True):
            self._publish_model_info(loaded=True)
            return TransitionCallbackReturn.SUCCESS
        if self.service.load_error is None:  # shut down while loading
            return TransitionCallbackReturn.FAILURE
        self.get_logger().error(f'cannot load {self.config.settings.model}: '
                                f'{self.service.load_error}')
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state):
        self.service.activate()
        return super().on_activate(state)

    def on_deactivate(self, state):
        self.service.deactivate(INACTIVE)
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        before = _gpu_bytes()
        self.service.cleanup(wait=True)
        freed = before - _gpu_bytes()
        self.info.update(peak_source='unloaded')
        self.device_identity = None
        self.get_logger().info(f'model freed ({freed / 1e9:.2f} GB of GPU memory returned)'
                               if before else 'model freed')
        self._publish_model_info(loaded=False)
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        self.finish()
        self.finalized.set()
        return TransitionCallbackReturn.SUCCESS

    def finish(self, timeout=10.0):
        """Answer everything pending and wait (bounded) until subscribers have the answers.

        Returns False when the worker is still busy (inside a model load).
        """
        stopped = self.service.shutdown(timeout)
        for pub in (self._stream_pub, self._response_pub):
            try:
                pub.wait_for_all_acked(Duration(seconds=DELIVERY_TIMEOUT_S))
            except Exception as exc:  # the context may already be gone
                self.get_logger().warning(f'cannot wait for delivery: {exc}')
        return stopped

    # -- the decoder (on the service's worker thread) ----------------------------------------
    def _load_decoder(self):
        decoder = build_decoder(self.config.settings)
        measured = measure_copy_bandwidth(decoder.device)
        if self.config.bandwidth_override_gbps > 0:
            peak, source = self.config.bandwidth_override_gbps * 1e9, 'parameter'
        elif self.gpu.available and self.gpu.peak_bandwidth and decoder.device.type == 'cuda':
            peak, source = self.gpu.peak_bandwidth, self.gpu.peak_source
        else:
            peak, source = None, 'unavailable (no NVML); fractions use measured bandwidth'
        properties = None
        if decoder.device.type == 'cuda':
            import torch
            properties = torch.cuda.get_device_properties(decoder.device)
        self.device_identity = DeviceIdentity.from_torch(decoder.device, properties)
        self.live.reset()
        dtype = str(decoder.loaded.model.dtype).replace('torch.', '')
        self.info.update(
            model=decoder.loaded.name, dtype=dtype, backend=decoder.backend.name,
            weights=decoder.weights, mode=decoder.mode, device=str(decoder.device),
            max_context=decoder.max_context, graph_fallbacks=decoder.graph_fallbacks,
            kernel_configs=decoder.kernel_configs_source,
            fallback_reason=decoder.fallback_reason, peak_bandwidth=peak, peak_source=source,
            measured_bandwidth=measured)
        for reason in (decoder.fallback_reason, decoder.prefill_fallback_reason):
            if reason:
                self.get_logger().warning(reason)
        weights = f'{dtype} weights as loaded' if decoder.weights == 'bf16' else (
            f'{decoder.weights} weights')
        self.get_logger().info(
            f'ready: {decoder.loaded.name} on {decoder.device}, {decoder.mode} mode, '
            f'{decoder.backend.name} backend, {weights}, max_context {decoder.max_context}')
        return decoder

    # -- publishing -------------------------------------------------------------------------
    def _publish_stream(self, request_id, index, text):
        self._stream_pub.publish(String(data=json.dumps(
            {'id': request_id, 'index': index, 'text': text}, ensure_ascii=False)))

    def _publish_response(self, body):
        self._response_pub.publish(String(data=body))

    def _publish_latency(self, step_ms):
        self._latency_pub.publish(Float32(data=float(step_ms)))

    def _publish_model_info(self, loaded):
        keys = ('model', 'backend', 'weights', 'mode', 'dtype', 'max_context', 'device',
                'kernel_configs')
        body = {k: self.info.get(k) for k in keys} if loaded else {
            'model': self.config.settings.model}
        body.update(loaded=loaded, gpu=self.gpu.name if self.gpu.available else None)
        self._info_pub.publish(String(data=json.dumps(body)))

    def _publish_diagnostics(self):
        peak = self.info.get('peak_bandwidth')
        measured = self.info.get('measured_bandwidth')
        stats = self.service.window.stats(peak or measured, measured) if measured else None
        if stats is not None and peak is None:
            stats = dataclasses.replace(stats, fraction_of_peak=None)
        reading = self.live.read(stats, self.service.window.total)
        array = build_array(self.get_clock().now().to_msg(), self.service.snapshot(), stats,
                            self.info, self.gpu, reading.sample, self.config.thresholds,
                            prefix=self.get_name(), device=self.device_identity, live=reading)
        for pub in self._diag_pubs:
            pub.publish(array)

    # -- runtime parameters -----------------------------------------------------------------
    def _on_set_parameters(self, parameters):
        result, config = check_update(self, parameters)
        if config is not None:
            self.service.limits = config.limits
            self.service.request_timeout_s = config.request_timeout_s
            if config.diagnostics_period != self.config.diagnostics_period:
                self._diag_timer.cancel()
                self.destroy_timer(self._diag_timer)
                self._diag_timer = self.create_timer(
                    config.diagnostics_period, self._publish_diagnostics,
                    callback_group=self._io)
            self.config = config
        return result


def _gpu_bytes():
    import torch
    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


def main(args=None):
    stop = StopSignal()
    with ros_session(args, handle_signals=False):
        stop.install()
        try:
            node = LlmDecoderNode()
        except ParameterError as exc:
            rclpy.logging.get_logger(NAME).fatal(str(exc))
            print(f'{NAME}: {exc}', file=sys.stderr)
            return 2
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        spinning = threading.Event()
        spinning.set()
        spinner = threading.Thread(target=_spin, args=(executor, spinning, stop.event),
                                   daemon=True)
        spinner.start()
        while not (stop.event.wait(0.5) or node.finalized.is_set()):
            pass
        if stop.received:
            node.get_logger().info(f'{stop.received}: answering pending requests, then exiting')
        stopped = node.finish()
        node.gpu.close()
        # Nothing is torn down while the spinner may be inside a wait on these entities: it
        # leaves its loop first, then the executor joins its callback threads.
        spinning.clear()
        spinner.join(timeout=SPIN_EXIT_S)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
    if not stopped:  # a model load cannot be interrupted; everything owed is answered
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


SPIN_EXIT_S = 10.0  # a callback in flight when the node stops: a parse, a publish


def _spin(executor, spinning, stop):
    """Spin in short waits until `spinning` is cleared (executor.spin() would be left only by
    executor.shutdown(), which destroys the executor's wake-up condition while this thread may
    still be waiting on it)."""
    try:
        while spinning.is_set():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop.set()


if __name__ == '__main__':
    sys.exit(main())
