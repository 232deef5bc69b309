"""Shared by the benchmarks: audit events inserted in SQL, fast, on PostgreSQL."""

from __future__ import annotations


def grow(total: int) -> None:
    """Insert rows in SQL (fast), spread over 30 days, 100 users and a handful of actions."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO compliance_auditevent (occurred_at, actor_id, actor_username, client_ip,
                request_id, action, object_type, object_id, method, path, status_code,
                latency_ms, details)
            SELECT now() - (g * interval '2.6 seconds'), NULL, 'user' || (g %% 100),
                   ('10.0.' || (g %% 7) || '.' || (g %% 250))::inet, md5(g::text),
                   (ARRAY['api.request', 'api.request', 'api.request',
                   'auth.login.succeeded', 'auth.login.failed'])[1 + g %% 5], '', '',
                   'GET', '/api/compliance/audit/events',
                   CASE WHEN g %% 997 = 0 THEN 500 WHEN g %% 50 = 0 THEN 404 ELSE 200 END,
                   3.5, '{"n":' || g || '}'
            FROM generate_series(1, %s) AS g
            """,
            [total],
        )
        cursor.execute("ANALYZE compliance_auditevent")
