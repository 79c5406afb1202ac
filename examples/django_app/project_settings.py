"""Settings of the example project. DATABASE_URL (a libpq URL or conninfo) is the database for
both the Django models and the ProcessGPT tables; the embedded database when it is unset."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

SECRET_KEY = "example-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["processgpt_sync.contrib.django", "notes"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if not os.environ.get("DATABASE_URL"):
    from processgpt_sync import embedded

    os.environ["DATABASE_URL"] = embedded.start()
_db = conninfo_to_dict(os.environ["DATABASE_URL"])
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname", "postgres"),
        "USER": _db.get("user", "postgres"),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }
}
PROCESSGPT_AGENT_ORCH = "django-notes"
PROCESSGPT_EXECUTOR = "notes.executors.save_note"
