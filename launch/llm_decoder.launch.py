"""Start the llm_decoder node in namespace /decode with the package's parameters YAML.

Launch arguments left empty keep the YAML's value; a value given here overrides it.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

OVERRIDES = ('model', 'device', 'mode', 'backend', 'weights')


def _node(context):
    params_file = LaunchConfiguration('params_file').perform(context)
    overrides = {}
    for name in OVERRIDES:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    mirror = LaunchConfiguration('mirror_diagnostics').perform(context)
    if mirror:
        overrides['mirror_diagnostics'] = mirror.lower() in ('true', '1', 'yes')
    return [Node(
        package='decode_monitor',
        executable='llm_decoder',
        name='llm_decoder',
        namespace=LaunchConfiguration('namespace'),
        parameters=[params_file, overrides],
        output='screen',
        emulate_tty=True,
        additional_env={'TQDM_DISABLE': '1'},  # no carriage-return progress bars in the log
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('decode_monitor'), 'config',
                                  'decoder.yaml')
    arguments = [
        DeclareLaunchArgument('namespace', default_value='decode'),
        DeclareLaunchArgument('params_file', default_value=default_params),
        DeclareLaunchArgument('model', default_value='',
                              description='smollm2, a preset, a checkpoint dir or a .gguf file'),
        DeclareLaunchArgument('device', default_value='', description='auto, cpu, cuda, cuda:N'),
        DeclareLaunchArgument('mode', default_value='', description='graph or eager'),
        DeclareLaunchArgument('backend', default_value='', description='auto, hf or fused'),
        DeclareLaunchArgument('weights', default_value='', description='bf16, int8 or int4'),
        DeclareLaunchArgument('mirror_diagnostics', default_value='',
                              description='true: also publish on /diagnostics'),
    ]
    return LaunchDescription(arguments + [OpaqueFunction(function=_node)])
