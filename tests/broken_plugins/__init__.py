"""Deliberately broken platform plugins: each module wraps the CPU plugin with exactly one fault.

tests/test_conformance.py installs them through a throwaway ``runtime.platforms`` entry point and
asserts that runtime-conformance fails each one with a message that points at its fault.
Every module exposes ``plugin`` (built by :func:`cpu_plugin`) and ``PLATFORM``, its platform name.
"""
