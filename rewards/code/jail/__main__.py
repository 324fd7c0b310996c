"""Entry point when this directory is run: imports it as the top-level package `jail`.

Putting rewards/code on sys.path (rather than importing `rewards.code.jail`) keeps
`rewards/__init__.py` and its dependencies out of the jail, which runs with `-I -S` and only
the standard library.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jail import main  # noqa: E402

sys.exit(main.main())
