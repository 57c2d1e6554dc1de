"""Start the llm_decoder node in namespace /decode with the package's parameters YAML.

Launch arguments left empty keep the YAML's value; a value given here overrides it. The node
is a managed (lifecycle) node: by default it configures and activates itself; with
`autostart:=false` it waits in `unconfigured` for a lifecycle manager (or
`ros2 lifecycle set /decode/llm_decoder configure`, then `activate`).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

from decode_monitor.node.launch_args import FLAGS, OVERRIDES, parameter_overrides


def _node(context):
    arguments = {name: LaunchConfiguration(name).perform(context)
                 for name in OVERRIDES + FLAGS}
    return [LifecycleNode(
        package='decode_monitor',
        executable='llm_decoder',
        name='llm_decoder',
        namespace=LaunchConfiguration('namespace').perform(context),
        parameters=[LaunchConfiguration('params_file').perform(context),
                    parameter_overrides(arguments)],
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
        DeclareLaunchArgument('mode', default_value='', description='auto, graph or eager'),
        DeclareLaunchArgument('backend', default_value='',
                              description='auto, hf, fused or persistent'),
        DeclareLaunchArgument('weights', default_value='', description='bf16, int8 or int4'),
        DeclareLaunchArgument('mirror_diagnostics', default_value='',
                              description='true: also publish on /diagnostics'),
        DeclareLaunchArgument('autostart', default_value='',
                              description='false: wait for a lifecycle manager'),
    ]
    return LaunchDescription(arguments + [OpaqueFunction(function=_node)])
