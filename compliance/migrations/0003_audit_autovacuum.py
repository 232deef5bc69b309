from django.db import migrations

# Each event is updated once when sealed, leaving a dead row version behind. PostgreSQL's
# default (vacuum after 20% of the table changed) would let millions pile up on a large trail;
# vacuum and analyze this table after a fixed number of changes instead, so the sealer's scan
# of the unsealed-events index stays short and the planner knows how few rows are unsealed.
TUNE = """
ALTER TABLE compliance_auditevent SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 20000
)
"""
RESET = """
ALTER TABLE compliance_auditevent RESET (
    autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold,
    autovacuum_analyze_scale_factor, autovacuum_analyze_threshold
)
"""


def tune(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(TUNE, params=None)


def reset(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(RESET, params=None)


class Migration(migrations.Migration):
    dependencies = [("compliance", "0002_append_only")]

    operations = [migrations.RunPython(tune, reset)]
