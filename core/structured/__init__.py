"""Structured output: grammars (xgrammar) compiled off the step loop, and the bitmask of each step."""
