#!/usr/bin/env python
"""A tiny Django project whose executor uses the ORM: `python manage.py processgpt_worker`."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
