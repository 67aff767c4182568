"""The top-level ``kernels/`` folder is ``lorafast.kernels`` and never shadows the PyPI package
``kernels`` (transformers 5.x requires it and imports it with its models), even when the
repository root is on sys.path, as ``python -m pytest`` and ``python -c`` in a checkout put it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(code: str) -> str:
    """Run ``code`` with ``python -c`` in the repository root (sys.path[0] is then that root)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_top_level_kernels_is_never_this_folder():
    out = run_in_root(
        "import importlib.machinery, os, sys\n"
        "assert os.path.realpath(sys.path[0] or os.curdir) == os.getcwd()\n"
        "elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.getcwd()]\n"
        "installed = importlib.machinery.PathFinder.find_spec('kernels', elsewhere)\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as error:\n"
        "    assert installed is None and error.name == 'kernels' and 'kernels' not in sys.modules\n"
        "    print('absent')\n"
        "else:\n"
        "    assert kernels.__file__ == installed.origin, (kernels.__file__, installed)\n"
        "    print('installed', kernels.__file__)\n"
    )
    assert out == "absent" or (out.startswith("installed ") and str(ROOT / "kernels") not in out)


def test_without_the_pypi_package_a_top_level_import_fails_cleanly():
    out = run_in_root(
        "import sys\n"
        "sys.path[:] = [''] + [p for p in sys.path if 'packages' not in p and p]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name, 'kernels' in sys.modules)\n"
    )
    assert out == "kernels False"


def test_transformers_models_and_lorafast_kernels_import_from_the_repository_root():
    out = run_in_root(
        "import transformers.modeling_utils\n"
        "import os, lorafast.kernels as k\n"
        "print(os.path.realpath(k.__file__), callable(k.lora_forward))\n"
    )
    assert out == f"{ROOT / 'kernels' / '__init__.py'} True"
