"""runtime-conformance: the checks every runtime platform plugin must pass.

Run them with ``pytest --pyargs runtime_conformance --runtime-platform NAME`` or
``runtime conformance --platform NAME``. Each check compares what the platform's plugin
registered with the core's reference implementations on fresh random inputs, within the
per-dtype tolerances of :mod:`runtime_conformance.tolerances`.
"""

__version__ = "0.2.0"
