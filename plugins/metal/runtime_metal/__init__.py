"""runtime-metal: the Metal platform plugin for runtime (Apple silicon GPUs through torch's MPS device)."""

__version__ = "0.2.0"
