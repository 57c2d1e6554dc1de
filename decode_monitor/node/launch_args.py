"""What the launch file's arguments become: parameter overrides on top of the YAML.

Pure (no launch import), so the rules are tested where launch_ros is not installed.
An argument left empty keeps the YAML's value.
"""
OVERRIDES = ('model', 'device', 'mode', 'backend', 'weights')
FLAGS = ('mirror_diagnostics', 'autostart')
TRUE, FALSE = ('true', '1', 'yes', 'on'), ('false', '0', 'no', 'off')


def parameter_overrides(arguments):
    """arguments: launch argument name -> the string it was given ('' when not given)."""
    overrides = {name: arguments[name] for name in OVERRIDES if arguments.get(name)}
    for name in FLAGS:
        value = arguments.get(name, '').strip().lower()
        if not value:
            continue
        if value not in TRUE + FALSE:
            raise ValueError(f'launch argument {name}:={arguments[name]!r} must be true or '
                             'false')
        overrides[name] = value in TRUE
    return overrides
