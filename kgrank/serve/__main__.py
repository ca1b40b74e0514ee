"""``python -m kgrank.serve EXPORT_DIR [options]``: the same as ``kgrank serve`` (see
``kgrank serve --help``), for environments without the console script."""

from __future__ import annotations

import sys

from kgrank.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
