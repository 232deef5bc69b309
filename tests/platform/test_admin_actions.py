"""Console actions change things, so they need more than the permission to look."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from bridge.roles import Role
from security.models import TokenFamily, User
from tests.conftest import make_user


def _console(user: User) -> Client:
    User.objects.filter(pk=user.pk).update(is_staff=True)
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_a_view_only_role_cannot_disable_a_beat_task_from_the_list():
    # given the audit sealer's periodic task and an operator, who may only view the schedule
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(name="seal", task="x", interval=every, enabled=True)
    console = _console(make_user("opal", Role.OPERATOR))
    url = "/admin/django_celery_beat/periodictask/"
    # then the list offers no action, and posting one anyway changes nothing
    page = console.get(url)
    assert page.status_code == 200
    assert b"disable_tasks" not in page.content
    console.post(url, {"action": "disable_tasks", "_selected_action": [task.pk]})
    task.refresh_from_db()
    assert task.enabled is True


@pytest.mark.django_db
def test_revoking_sessions_needs_the_revoke_permission_not_only_view(admin_user):
    family = TokenFamily.objects.create(user=admin_user)
    url = "/admin/security/tokenfamily/"
    action = {"action": "revoke", "_selected_action": [family.pk]}
    # given someone who may view sessions but not revoke them
    viewer = make_user("vic")
    viewer.user_permissions.add(Permission.objects.get(codename="view_tokenfamily"))
    _console(viewer).post(url, action)
    family.refresh_from_db()
    assert family.revoked_at is None
    # when a security officer (who holds the revoke permission) does it
    _console(make_user("sol", Role.SECURITY_OFFICER)).post(url, action)
    family.refresh_from_db()
    assert family.revoked_at is not None


@pytest.mark.django_db
def test_logging_a_user_out_everywhere_needs_the_revoke_permission(admin_user):
    viewer = make_user("vic")
    viewer.user_permissions.add(Permission.objects.get(codename="view_user"))
    before = User.objects.get(pk=admin_user.pk).token_version
    _console(viewer).post(
        "/admin/security/user/",
        {"action": "log_out_everywhere", "_selected_action": [admin_user.pk]},
    )
    assert User.objects.get(pk=admin_user.pk).token_version == before
