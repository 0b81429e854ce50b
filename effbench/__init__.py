"""effbench: benchmark and profile efficient attention mechanisms."""

__version__ = "0.1.0"
