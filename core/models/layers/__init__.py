"""Model building blocks, each calling platform ops rather than vendor code."""
