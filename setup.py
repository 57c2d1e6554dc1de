from glob import glob

from setuptools import find_packages, setup

package_name = 'decode_monitor'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    package_data={'decode_monitor.engine.fused': ['tuned/*.json'],  # kernel-config tables
                  'decode_monitor.bench': ['references/*.json']},  # reference profiles
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='decode_monitor maintainers',
    maintainer_email='maintainers@decode-monitor.dev',
    description='Batch-1 LLM decoder node with per-step latency and memory-floor diagnostics',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'llm_decoder = decode_monitor.node.decoder_node:main',
            'ask = decode_monitor.node.ask:main',
            'watch = decode_monitor.node.watch:main',
            'demo = decode_monitor.node.demo:main',
            'bench = decode_monitor.bench.cli:main',
        ],
    },
)
