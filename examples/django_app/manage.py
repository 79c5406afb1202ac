#!/usr/bin/env python
"""A tiny Django project whose executor uses the ORM. From this folder:

    python manage.py migrate                  # creates the notes table
    python manage.py processgpt_worker        # serves agent_orch django-notes
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
