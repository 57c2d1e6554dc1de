"""The node as a managed node: lifecycle services, runtime parameters, its name in diagnostics.

One node process, started with autostart false, renamed `left_decoder` and mirroring its
diagnostics to the global /diagnostics, driven through
the standard ~/change_state and ~/set_parameters services as a lifecycle manager and
`ros2 param set` would.
"""
import json
import signal

import pytest

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from decode_monitor.node.ask import wait_for  # noqa: E402
from ros_helpers import Client, start_node, stop_node  # noqa: E402

NS, NAME = '/lifecycle', 'left_decoder'


@pytest.fixture(scope='module')
def managed():
    node = start_node(NS, 'autostart:=false', 'max_context:=256', 'max_new_tokens_cap:=100',
                      'default_max_new_tokens:=8', 'mirror_diagnostics:=true', name=NAME)
    rclpy.init()
    client = Client(NS)
    client.get_state = client.create_client(GetState, f'{NS}/{NAME}/get_state')
    client.change_state = client.create_client(ChangeState, f'{NS}/{NAME}/change_state')
    client.set_params = client.create_client(SetParameters, f'{NS}/{NAME}/set_parameters')
    assert wait_for(client, lambda: client.change_state.service_is_ready()
                    and client.set_params.service_is_ready(), 60), 'no lifecycle services'
    yield client
    client.destroy_node()
    rclpy.try_shutdown()
    out = stop_node(node, signal.SIGINT)
    assert node.returncode == 0, out


def call(client, service, request, timeout=240):
    future = service.call_async(request)
    assert wait_for(client, future.done, timeout), 'service call did not return'
    return future.result()


def state(client):
    return call(client, client.get_state, GetState.Request()).current_state.label


def transition(client, transition_id):
    return call(client, client.change_state,
                ChangeState.Request(transition=Transition(id=transition_id))).success


def set_param(client, name, value):
    if isinstance(value, bool):
        v = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    elif isinstance(value, int):
        v = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    elif isinstance(value, float):
        v = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    else:
        v = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    result = call(client, client.set_params,
                  SetParameters.Request(parameters=[Parameter(name=name, value=v)]))
    return result.results[0]


def ask(client, **request):
    request_id = client.send(request.pop('prompt', 'Say hi.'), **request)
    return client.responses_for([request_id])[0]


def test_lifecycle_from_unconfigured_to_serving_and_back(managed):
    c = managed
    assert state(c) == 'unconfigured'
    assert wait_for(c, lambda: c.values('decode', NAME).get('state') == 'unconfigured', 10)
    assert 'unconfigured' in ask(c)['error']  # refused, naming the state
    assert transition(c, Transition.TRANSITION_CONFIGURE) and state(c) == 'inactive'
    assert 'inactive' in ask(c)['error']
    assert transition(c, Transition.TRANSITION_ACTIVATE) and state(c) == 'active'
    body = ask(c)
    assert body['status'] == 'done' and body['tokens'] > 0
    # a late joiner still learns what is loaded (transient local)
    infos = []
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    c.create_subscription(String, f'{NS}/model_info', lambda m: infos.append(json.loads(m.data)),
                          latched)
    assert wait_for(c, lambda: infos, 10), 'no model_info for a late subscriber'
    assert infos[-1]['loaded'] and infos[-1]['model'] == 'SmolLM2-135M-Instruct'
    assert infos[-1]['device'] == 'cpu' and infos[-1]['max_context'] == 256
    # deactivate mid-request: the running request is answered, naming the state
    long_id = c.send('Tell me a long story.', max_new_tokens=100)
    assert wait_for(c, lambda: c.streamed(long_id), 60)
    assert transition(c, Transition.TRANSITION_DEACTIVATE) and state(c) == 'inactive'
    body = c.responses_for([long_id])[0]
    assert body['status'] == 'error' and 'inactive' in body['error']
    assert c.streamed(long_id) == body['text']
    assert transition(c, Transition.TRANSITION_CLEANUP) and state(c) == 'unconfigured'
    assert wait_for(c, lambda: not infos[-1]['loaded'], 10)
    assert 'unconfigured' in ask(c)['error']
    assert transition(c, Transition.TRANSITION_CONFIGURE)
    assert transition(c, Transition.TRANSITION_ACTIVATE)
    assert ask(c)['status'] == 'done'


def test_status_names_follow_the_node_name_and_a_cpu_run_is_ok(managed):
    c = managed
    assert wait_for(c, lambda: c.values('decode', NAME).get('state') == 'ready', 240)
    array = c.arrays[-1]
    assert [s.name for s in array.status] == [
        f'{NAME}: decode', f'{NAME}: gpu', f'{NAME}: requests']
    decode = array.status[0]
    assert decode.level == b'\x00', decode.message  # mode auto: eager on a CPU is healthy
    values = {kv.key: kv.value for kv in decode.values}
    assert values['mode requested'] == 'auto' and values['mode'] == 'eager'
    assert values['graph fallbacks'] == '0'


def test_mirror_diagnostics_publishes_the_same_arrays_on_the_global_topic(managed):
    """mirror_diagnostics: each array also goes to /diagnostics, where diagnostic_aggregator
    listens, named after the node as on its own topic."""
    c = managed
    mirrored = []
    c.create_subscription(DiagnosticArray, '/diagnostics', mirrored.append, 10)
    assert wait_for(c, lambda: mirrored, 10), 'nothing on /diagnostics'
    assert [s.name for s in mirrored[-1].status] == [
        f'{NAME}: decode', f'{NAME}: gpu', f'{NAME}: requests']
    stamp = mirrored[-1].header.stamp  # the array on the node's own topic, published as well
    assert wait_for(c, lambda: any(a.header.stamp == stamp for a in c.arrays), 5)
    assert c.count_publishers('/diagnostics') == 1
    assert c.count_publishers(f'{NS}/diagnostics') == 1


def test_thresholds_and_limits_change_at_runtime_and_are_checked(managed):
    c = managed
    assert wait_for(c, lambda: c.values('decode', NAME).get('state') == 'ready', 240)
    result = set_param(c, 'latency_budget_ms', 50)  # an integer for a double
    assert result.successful, result.reason
    result = set_param(c, 'max_new_tokens_cap', 4096)
    assert not result.successful and 'max_context' in result.reason
    result = set_param(c, 'model', 'tiny')
    assert not result.successful and 'read-only' in result.reason
    result = set_param(c, 'latency_budget_ms', 'fast')
    assert not result.successful and 'latency_budget_ms' in result.reason
    assert set_param(c, 'max_new_tokens_cap', 20).successful
    assert 'between 1 and 20' in ask(c, max_new_tokens=30)['error']
    assert set_param(c, 'latency_budget_ms', 0.001).successful  # every step is over it now
    ask(c, max_new_tokens=10)
    assert wait_for(c, lambda: c.arrays[-1].status[0].level == b'\x02', 10), (
        c.arrays[-1].status[0].message)
    assert 'over twice the budget' in c.arrays[-1].status[0].message
    assert set_param(c, 'latency_budget_ms', 0.0).successful
