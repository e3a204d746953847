"""The plugin contract's version.

MAJOR changes when a hook or interface changes incompatibly; MINOR when something is added
that old plugins may ignore. A plugin declares the versions it supports as a PEP 440
specifier (``RUNTIME_CONTRACT = ">=1.0,<2"``); the core loads it only when its version matches.
"""

CONTRACT_VERSION = "1.15"
