"""Entry point when this directory is run: loads it as package `lockstep_jail` and runs it.

Loading by file location keeps `rewards/__init__.py` (pydantic and friends) out of the
jail, which runs with `-I -S` and only the standard library.
"""
import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "lockstep_jail", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here])
_pkg = importlib.util.module_from_spec(_spec)
sys.modules["lockstep_jail"] = _pkg
_spec.loader.exec_module(_pkg)

from lockstep_jail import main  # noqa: E402

sys.exit(main.main())
