"""Import the agip of the checkout these scripts live in (a study runs them from a git
worktree of a fixed commit, beside an editable install of another checkout), without
putting the checkout's root on ``sys.path`` ahead of the installed packages.
``agip.csrc`` and ``agip.kernels`` come from the same checkout too
(``agip.backends.source_dir``)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if "agip" not in sys.modules:
    _pkg = os.path.join(ROOT, "agip")
    _spec = importlib.util.spec_from_file_location("agip", os.path.join(_pkg, "__init__.py"),
                                                   submodule_search_locations=[_pkg])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["agip"] = _module
    _spec.loader.exec_module(_module)
