"""The checks, one module per area; pytest collects them with --pyargs runtime_conformance."""
