"""The built wheel, installed into a fresh virtualenv as a user would: everything imports."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Run inside the fresh virtualenv: every module of the package, the Django app and its command,
# the examples; first with a2a-sdk hidden (it is optional), then the modules that need it
# (examples/a2a_executor.py is written for a2a-sdk 0.3, hence the a2a-v03 extra).
CHECK = r"""
import importlib, importlib.abc, json, pkgutil, sys
from pathlib import Path

class NoA2A(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "a2a" or name.startswith("a2a."):
            raise ImportError(f"{name} is hidden: the library must work without a2a-sdk")
        return None

NEEDS_A2A = {"processgpt_sync.a2a", "processgpt_sync.examples.a2a_executor"}
sys.meta_path.insert(0, NoA2A())
import processgpt_sync
examples = importlib.import_module("processgpt_sync.examples")  # a folder without __init__
names = sorted({m.name for m in pkgutil.walk_packages(processgpt_sync.__path__,
                                                      "processgpt_sync.")}
               | {m.name for m in pkgutil.iter_modules(examples.__path__,
                                                       "processgpt_sync.examples.")})
for name in names:
    if name not in NEEDS_A2A and not name.endswith("__main__"):
        importlib.import_module(name)
sys.meta_path.pop(0)
for name in sorted(NEEDS_A2A):
    importlib.import_module(name)

from django.conf import settings
settings.configure(INSTALLED_APPS=["processgpt_sync.contrib.django"])
import django
django.setup()
from django.core.management import get_commands
from processgpt_sync.queries import read_sql
from processgpt_sync.console.app import HERE as CONSOLE
print(json.dumps({
    "console": all((CONSOLE / f).is_file() for f in ("templates/base.html", "static/console.css")),
    "file": processgpt_sync.__file__, "modules": names,
    "command": get_commands().get("processgpt_worker"),
    "sql": read_sql("functions.sql") == (Path(sys.argv[1]) / "sql/functions.sql").read_text(),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built as a release is: the source distribution first, then the wheel from it (a wheel
    built in the checkout would also ship whatever an earlier build left in its build/)."""
    outdir = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (built,) = outdir.glob("processgpt_sync-*.whl")
    return built


def test_wheel_ships_the_sql_examples_and_django_app(wheel):
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for required in ("processgpt_sync/sql/schema.sql", "processgpt_sync/sql/functions.sql",
                     "processgpt_sync/sql/queries.sql", "processgpt_sync/examples/quickstart.py",
                     "processgpt_sync/examples/blocking_executor.py", "processgpt_sync/py.typed",
                     "processgpt_sync/contrib/django/apps.py",
                     "processgpt_sync/contrib/django/management/commands/processgpt_worker.py",
                     "processgpt_sync/console/templates/todo.html",
                     "processgpt_sync/console/static/htmx.min.js",
                     "processgpt_sync/console/static/console.js",
                     "processgpt_sync_pytest.py"):
        assert required in names
    sql = archive.read("processgpt_sync/sql/functions.sql").decode()
    assert sql == (ROOT / "sql/functions.sql").read_text(), "the wheel ships the one source"


def test_the_wheel_in_a_fresh_virtualenv_imports_every_module(wheel, tmp_path):
    import json

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    # pytest: the testing kit's plugin
                    f"{wheel}[django,a2a-v03,console]", "pytest"],
                   check=True, capture_output=True, timeout=600)
    result = subprocess.run([str(python), "-c", CHECK, str(ROOT)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["file"].startswith(str(env_dir)), "imported from the wheel, not the checkout"
    for module in ("processgpt_sync.contrib.django.management.commands.processgpt_worker",
                   "processgpt_sync.examples.blocking_executor", "processgpt_sync.examples.hitl",
                   "processgpt_sync.storage.supabase", "processgpt_sync.cli",
                   "processgpt_sync.console.app"):
        assert module in found["modules"]
    assert found["command"] == "processgpt_sync.contrib.django"
    assert found["sql"]
    assert found["console"], "the console's templates and static files are installed"
    version = subprocess.run([str(env_dir / "bin" / "processgpt-sync"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("processgpt-sync 0.1.0"), version.stderr
