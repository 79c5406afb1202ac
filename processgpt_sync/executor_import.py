"""Find the executor a command line names: ``module:attribute`` or ``path/to/file.py:attribute``.

Shared by the ``serve`` command, the supervisor's child processes and the Django management
command. Owns the import and the checks that make a bad name a ConfigurationError at start; it
must not adapt, run or print anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigurationError


def load_executor(target: str) -> Any:
    """Import ``module:attribute`` or ``path/to/file.py:attribute``; a class is instantiated
    without arguments. Anything that cannot work is a ConfigurationError, found now."""
    obj = import_target(target)
    if not isinstance(obj, type):
        return obj
    module_name, _, attribute = target.rpartition(":")
    try:
        inspect.signature(obj).bind()
    except TypeError as exc:
        raise ConfigurationError(
            f"{attribute}() needs arguments ({exc}); the CLI instantiates a class without "
            f"arguments, so create the instance in {module_name} (executor = {attribute}(...)) "
            f"and serve {module_name}:executor"
        ) from None
    except ValueError:  # no signature to inspect: just try
        pass
    try:
        return obj()
    except Exception as exc:  # a missing API key, say: restarting the process would not help
        raise ConfigurationError(
            f"{attribute}() failed as it was made: {type(exc).__name__}: {exc}") from exc


def import_target(target: str) -> Any:
    """The object named by ``module:attribute`` or ``path/to/file.py:attribute``, as is."""
    module_name, _, attribute = target.rpartition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"executor must be given as module:attribute or "
                                 f"path/to/file.py:attribute, got {target!r}")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(Path(module_name))
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    return obj


def _import_file(path: Path) -> Any:
    """Import a Python file by path; its folder goes on sys.path for its own imports."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigurationError(f"no such executor file: {path}")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {path}: {exc}") from exc
    return module
