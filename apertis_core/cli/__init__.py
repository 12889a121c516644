"""The `apertis` command line: thin entry points over apertis_core's library API.

This package is the only place in apertis_core that parses argv. `main.py` builds the parser and turns
user errors into one-line messages; each command lives in its own module with `register(subparsers)`.
"""
