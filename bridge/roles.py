"""Roles in code: a map of role to model permissions, synchronised after every migrate.

Roles are Django groups; what a group may do is this map and nothing else, so the API and the
console (both asking `user.has_perm`) can never disagree, and a new app grants its permissions
by adding lines here instead of writing a data migration. Each entry is `app_label.codename`,
or `app_label.verb_*` for that verb on every model of the app.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.signals import post_migrate
from django.dispatch import receiver


class Role(models.TextChoices):
    """The groups that grant access to each area of the API and console."""

    OPERATOR = "operator", "Operator (recovery, backups)"
    SECURITY_OFFICER = "security_officer", "Security officer (security)"
    COMPLIANCE_OFFICER = "compliance_officer", "Compliance officer (compliance, reports)"


ROLE_PERMISSIONS: dict[Role, tuple[str, ...]] = {
    Role.OPERATOR: (
        "django_celery_beat.view_*",
        "recovery.view_*",
        "recovery.add_service",
        "recovery.change_service",
        "recovery.delete_service",
        "recovery.check_service",
        "recovery.heal_service",
        "backups.view_*",
        "backups.run_backup",
        "backups.verify_backup",
        "backups.restore_backup",
        "backups.cleanup_backups",
        "backups.delete_backup",
        "compliance.log_custom_event",
        # Segregation of duties: a second operator approves a live restore.
        "compliance.view_approvalrequest",
        "compliance.decide_approvalrequest",
    ),
    Role.SECURITY_OFFICER: (
        "security.view_*",
        "security.revoke_tokenfamily",
        "security.lift_ipban",
        "security.use_crypto",
        "security.rotate_datakey",
        "security.run_security_selftest",
        "security.add_storedsecret",
        "security.change_storedsecret",
        "security.delete_storedsecret",
        "compliance.view_auditcheckpoint",
        "axes.view_*",
        "axes.delete_accessattempt",
        "token_blacklist.view_*",
        # Users' authenticators: see who enrolled one, remove a lost one (never its secret).
        "otp_totp.view_totpdevice",
        "otp_totp.delete_totpdevice",
        "compliance.log_custom_event",
        # Segregation of duties: a second security officer approves a key rotation.
        "compliance.view_approvalrequest",
        "compliance.decide_approvalrequest",
    ),
    Role.COMPLIANCE_OFFICER: (
        "compliance.view_*",
        # Auditors read the threat picture (GET /api/security/threats, the dashboard panel,
        # the event list); acting on it (bans, sessions) stays with security officers.
        "security.view_threatevent",
        # Backup evidence (backups, copies, drills) for audits; starting or restoring is not theirs.
        "backups.view_backup",
        "backups.view_backupcopy",
        "backups.view_restorejob",
        "compliance.log_custom_event",
        "compliance.verify_chain",
        "compliance.cancel_verification",
        "compliance.process_datasubjectrequest",
        "compliance.add_datasubjectrequest",
        "compliance.record_consent",
        "compliance.add_privacynotice",
        "compliance.generate_report",
        "compliance.add_legalhold",
        "compliance.release_legalhold",
        "compliance.purge_auditevent",
        "compliance.run_compliance_test",
    ),
}


def resolve(entries: tuple[str, ...]) -> models.QuerySet:
    """The Permission rows an entry list names (a name with no match is simply absent)."""
    from django.contrib.auth.models import Permission

    match = models.Q(pk__in=[])
    for entry in entries:
        app_label, codename = entry.split(".", 1)
        if codename.endswith("*"):
            match |= models.Q(content_type__app_label=app_label, codename__startswith=codename[:-1])
        else:
            match |= models.Q(content_type__app_label=app_label, codename=codename)
    return Permission.objects.filter(match)


def sync_roles() -> None:
    """Make every role's group hold exactly the permissions of the map."""
    from django.contrib.auth.models import Group

    for role, entries in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        group.permissions.set(resolve(entries))


@receiver(post_migrate)
def sync_roles_after_migrate(sender: Any, **kwargs: Any) -> None:
    """After migrate (and after a test flush), once every app has sent post_migrate."""
    from django.apps import apps
    from django.contrib.auth.management import create_permissions

    if kwargs.get("using", "default") != "default":
        return
    # This receiver may run before auth's for the same app (INSTALLED_APPS order decides), so
    # the sender's permissions are made first; at the last app, every permission exists.
    create_permissions(sender, verbosity=0, using=kwargs.get("using", "default"))
    last = [config for config in apps.get_app_configs() if config.models_module][-1]
    if sender is last:
        sync_roles()
