"""Tools around the trainer: sweeps and results tables, analysis and curves, benchmarks.

The training path (``dks_jax.train`` and what it imports) imports nothing from here. Each tool is a
command, ``python -m dks_jax.tools.<name> --help``, with absl flags (``dks_jax/cli.py``).
"""
