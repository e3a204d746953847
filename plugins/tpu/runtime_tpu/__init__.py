"""runtime-tpu: the TPU platform plugin for runtime (Google TPUs through torch-xla)."""

__version__ = "0.2.0"
