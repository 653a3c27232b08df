"""`python -m meshtrain ...` is the same as the `meshtrain` command."""

from meshtrain.cli import main

if __name__ == "__main__":  # spawned workers import this module again: do not rerun the CLI
    raise SystemExit(main())
