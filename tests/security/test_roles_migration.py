"""The roles exist because a migration made them, with the console permissions each needs."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

ROLES = ["compliance_officer", "operator", "security_officer"]


def _migrate(*targets: tuple[str, str]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(list(targets))


@pytest.fixture
def back_to_latest():
    """Every app migrated forward again afterwards: later tests need every table."""
    yield
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    _migrate(*executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_the_roles_migration_creates_the_three_groups_with_their_permissions(back_to_latest):
    # given the schema just before the roles migration (its reverse drops the groups)
    _migrate(("security", "0001_initial"))
    assert not Group.objects.filter(name__in=ROLES).exists()
    # when
    _migrate(("security", "0002_roles"))
    # then
    groups = {
        group.name: set(group.permissions.values_list("codename", flat=True))
        for group in Group.objects.filter(name__in=ROLES)
    }
    assert sorted(groups) == ROLES
    assert {"view_auditevent", "view_auditseal", "view_auditverification"} <= groups[
        "compliance_officer"
    ]
    assert not any(
        code.startswith(("add_", "change_", "delete_")) for code in groups["compliance_officer"]
    )
    assert {"view_user", "view_accessattempt", "delete_accessattempt"} <= groups["security_officer"]
    assert "view_periodictask" in groups["operator"]
    assert "view_auditevent" not in groups["operator"]
