"""`python -m apertis_core ...` is the `apertis` command line."""

from .cli.main import main

raise SystemExit(main())
