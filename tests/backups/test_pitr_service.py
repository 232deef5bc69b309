"""Point-in-time recovery through the backup services, as the API and the CLI run it: a full
backup (with its base backup) of a PostgreSQL server archiving its WAL, then a restore of the
database to a time between two writes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backups import pitr, services
from backups.choices import BackupStatus, RestoreStatus
from bridge.jobs import run_job
from compliance.audit import AuditContext
from tests.backups.pg_cluster import (  # noqa: F401  (fixtures)
    ArchivingCluster,
    pg_cluster_fixture,
    postgres_python_fixture,
)

SYSTEM = AuditContext.system()


def labels(cluster: ArchivingCluster, data_dir: Path) -> list[str]:
    with pitr.PrivateServer(data_dir, env=cluster.env) as restored:
        return [row[0] for row in restored.query("SELECT label FROM t ORDER BY id")]


@pytest.mark.servers
def test_restore_to_a_time_through_the_services(pg_cluster, settings, monkeypatch):
    cluster = pg_cluster
    settings.BACKUP_PITR_PYTHON = cluster.python
    # The replay's fetch_wal children reach this test's catalog and keys.
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    cluster.sql("CREATE TABLE t (id serial PRIMARY KEY, label text NOT NULL)")

    backup = services.start_backup(
        kind="full", context=SYSTEM, components=["database"], enqueue=False
    )
    run_job(backup.job_id, services.run_backup_job)
    backup.refresh_from_db()
    assert backup.status == BackupStatus.SUCCEEDED, backup.error
    assert services.PITR_BASE_UNIT in backup.manifest["database"]["units"]

    cluster.sql("INSERT INTO t (label) VALUES ('first')")
    time.sleep(1.1)
    between = datetime.now(UTC)
    time.sleep(1.1)
    cluster.sql("INSERT INTO t (label) VALUES ('second')")
    cluster.wait_archived(cluster.switch_wal())
    window = services.pitr_window()
    assert window["from"] <= between <= window["until"]

    restore = services.start_restore(
        backup=backup,
        context=SYSTEM,
        components=["database"],
        target_time=between,
        enqueue=False,
    )
    run_job(restore.job_id, services.run_restore_job)
    restore.refresh_from_db()
    assert restore.status == RestoreStatus.SUCCEEDED, restore.error
    assert labels(cluster, Path(restore.result["data_dir"])) == ["first"]

    # Out of the window: refused before anything starts, naming the field.
    with pytest.raises(services.BackupRefused) as refused:
        services.start_restore(
            backup=backup,
            context=SYSTEM,
            components=["database"],
            target_time=datetime(2001, 1, 1, tzinfo=UTC),
            enqueue=False,
        )
    assert refused.value.field == "target_time"
