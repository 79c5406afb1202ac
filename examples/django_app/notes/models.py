from __future__ import annotations

from django.db import models


class Note(models.Model):
    """What the executor stores for each todo, through the ORM."""

    todo_id = models.CharField(max_length=36, unique=True)
    text = models.TextField()
    created = models.DateTimeField(auto_now_add=True)
