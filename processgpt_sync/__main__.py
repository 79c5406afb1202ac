"""`python -m processgpt_sync` is the `processgpt-sync` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
