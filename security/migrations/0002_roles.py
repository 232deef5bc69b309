from django.db import migrations

# Model permissions each role gets in the admin console (API access is checked by group name).
ROLE_PERMISSIONS = {
    "operator": [
        ("django_celery_beat", ["view"]),
    ],
    "security_officer": [
        ("security", ["view"]),
        ("axes", ["view", "delete"]),
        ("token_blacklist", ["view"]),
    ],
    "compliance_officer": [
        ("compliance", ["view"]),
    ],
}


def create_roles(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # Permissions are normally created after all migrations; create them now to assign them.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, grants in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        for app_label, verbs in grants:
            for verb in verbs:
                group.permissions.add(
                    *Permission.objects.filter(
                        content_type__app_label=app_label, codename__startswith=f"{verb}_"
                    )
                )


def drop_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLE_PERMISSIONS).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("security", "0001_initial"),
        ("compliance", "0002_append_only"),
        ("axes", "__latest__"),
        ("token_blacklist", "__latest__"),
        ("django_celery_beat", "__latest__"),
        ("auth", "__latest__"),
        ("contenttypes", "__latest__"),
    ]

    operations = [migrations.RunPython(create_roles, drop_roles)]
