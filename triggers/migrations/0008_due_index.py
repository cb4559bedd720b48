from django.db import migrations, models


def index_due(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Give the open scheduled and running instances their due time (triggers.timers)."""
    from types import SimpleNamespace

    from triggers.timers import due_at
    from triggers.types import TaskStatus

    instance_model = apps.get_model("triggers", "TriggerInstance")
    db = schema_editor.connection.alias
    rows = instance_model.objects.using(db).filter(status__in=["scheduled", "running"])
    for row in rows.iterator():
        start = row.metadata.get("start_after")
        instance = SimpleNamespace(status=TaskStatus(row.status), metadata=row.metadata,
                                   start_after=float(start) if start is not None else None)
        row.due = due_at(instance)  # type: ignore[arg-type]
        row.save(update_fields=["due"])


class Migration(migrations.Migration):

    dependencies = [
        ('triggers', '0007_delayed_instances'),
    ]

    operations = [
        migrations.AddField(
            model_name='triggerinstance',
            name='due',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name='triggerinstance',
            index=models.Index(condition=models.Q(('due__isnull', False)), fields=['due'], name='triggers_instance_due'),
        ),
        migrations.RunPython(index_due, migrations.RunPython.noop),
    ]
