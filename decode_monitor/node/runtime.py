"""rclpy start-up and shutdown that work on every ROS 2 distribution from Humble on.

`rclpy.init()` returns a context manager from Kilted on and None before, so nothing here uses
its return value: `ros_session()` pairs init with try_shutdown itself.
`ros_session(handle_signals=False)` leaves SIGINT and SIGTERM to the caller: rclpy's own
handler shuts the context down first, after which a node can no longer publish the answers it
still owes. `StopSignal` turns both signals into an event instead. `spin_once` is the clients'
spin, safe against a signal between two spins.
"""
from contextlib import contextmanager
import logging
import signal
import threading

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.signals import SignalHandlerOptions


@contextmanager
def ros_session(args=None, handle_signals=True):
    """rclpy.init(), then rclpy.try_shutdown() on the way out, whatever happened."""
    options = {} if handle_signals else {'signal_handler_options': SignalHandlerOptions.NO}
    rclpy.init(args=args, **options)
    try:
        yield
    finally:
        rclpy.try_shutdown()


def spin_once(node, timeout_sec):
    """rclpy.spin_once, with a context shut down under it reported as the
    ExternalShutdownException that callers handle. A signal between two spins has rclpy's
    handler shut the context down and reset the global executor; the next spin then fails to
    make one on the dead context with an RCLError instead, and the half-made executor's
    __del__ prints a traceback; so a context already shut down is reported before any spin."""
    if not rclpy.ok():
        raise ExternalShutdownException()
    try:
        rclpy.spin_once(node, timeout_sec=timeout_sec)
    except ExternalShutdownException:
        raise
    except Exception:
        if rclpy.ok():
            raise
        raise ExternalShutdownException() from None


class StopSignal:
    """SIGINT and SIGTERM set `event` (and `received` names the signal)."""

    def __init__(self):
        self.event = threading.Event()
        self.received = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self.event.set()


class RosLogHandler(logging.Handler):
    """Python logging records (transformers', the engine's) into a ROS logger, so they reach
    /rosout and the launch screen with the node's name instead of raw stderr."""

    def __init__(self, ros_logger):
        super().__init__()
        self._ros_logger = ros_logger

    def emit(self, record):
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self._ros_logger.error(message)
            elif record.levelno >= logging.WARNING:
                self._ros_logger.warning(message)
            else:
                self._ros_logger.info(message)
        except Exception:  # logging must never take the node down
            self.handleError(record)


def route_python_logging(ros_logger, names=('transformers', 'decode_monitor')):
    """Send these Python loggers to ros_logger (warnings and up) and silence progress bars."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
    except ImportError:
        pass
    handler = RosLogHandler(ros_logger)
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
