"""The shop app's tables (made by ``manage.py makemigrations shop``, lines wrapped)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="IndexBuild",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("task_id", models.CharField(max_length=64, unique=True)),
                ("built_at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
        migrations.CreateModel(
            name="Invoice",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("order_id", models.IntegerField()),
                ("task_id", models.CharField(max_length=64, unique=True)),
            ],
        ),
    ]
