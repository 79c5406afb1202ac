"""An executor that uses the Django ORM from worker threads."""

from __future__ import annotations

from notes.models import Note
from processgpt_sync import Todo


def save_note(todo: Todo) -> dict[str, object]:
    note, _ = Note.objects.get_or_create(todo_id=todo.id, defaults={"text": todo.input})
    return {"note_id": note.pk, "notes": Note.objects.count()}
