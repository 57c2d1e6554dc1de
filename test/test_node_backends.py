"""The fused backend with quantised weights inside the real node process: what the node streams
is what the engine decodes with the same settings in this process."""
import json
import signal

import pytest

rclpy = pytest.importorskip('rclpy')
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from decode_monitor.node.ask import wait_for  # noqa: E402
from ros_helpers import Client, start_node, stop_node  # noqa: E402

NS = '/backends'


def test_fused_int8_in_the_node_matches_the_engine():
    import torch
    from decode_monitor.engine.decoder import Decoder
    from decode_monitor.engine.sampling import SamplingParams
    from decode_monitor.engine.sources import load_model
    node = start_node(NS, 'model:=tiny', 'dtype:=float32', 'backend:=fused', 'weights:=int8',
                      'max_context:=128', 'max_new_tokens_cap:=16', 'default_max_new_tokens:=8',
                      'mirror_diagnostics:=true')
    rclpy.init()
    try:
        client = Client(NS)
        mirrored, infos = [], []
        from diagnostic_msgs.msg import DiagnosticArray
        client.create_subscription(DiagnosticArray, '/diagnostics', mirrored.append, 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        client.create_subscription(String, f'{NS}/model_info',
                                   lambda m: infos.append(json.loads(m.data)), latched)
        client.wait_ready()
        body = client.responses_for([client.send('hello', max_new_tokens=12)])[0]
        assert body['status'] == 'done' and body['tokens'] == 12, body
        engine = Decoder(load_model('tiny', dtype=torch.float32), mode='eager',
                         backend='fused', max_context=128, weights='int8')
        ids = [s.token for s in engine.generate(list(b'hello'), SamplingParams(), 12)]
        assert body['text'] == ''.join(f'<{i}>' for i in ids)
        decode = client.values('decode')
        assert (decode['backend'], decode['weights']) == ('fused', 'int8')
        assert wait_for(client, lambda: infos and mirrored, 10)
        assert infos[-1]['weights'] == 'int8' and infos[-1]['backend'] == 'fused'
        assert [s.name for s in mirrored[-1].status][0] == 'llm_decoder: decode'
    finally:
        rclpy.try_shutdown()
        out = stop_node(node, signal.SIGINT)
    assert node.returncode == 0, out
