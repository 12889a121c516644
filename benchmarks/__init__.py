"""Benchmarks of the Apertis model and training recipes (`apertis bench ...`); see benchmarks/README.md."""
