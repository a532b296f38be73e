"""Entry point of the `cdb-vq` console script (pyproject.toml `[project.scripts]`); the CLI is `tools/cli.py`.

Kept at this path so installs made before the move to `cdb_tokenizer/tools/` keep a working `cdb-vq` without
reinstalling. Not remote code: only the console script imports it.
"""

from .tools.cli import main


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
