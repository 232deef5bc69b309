"""Thin Celery tasks of the recovery area: take ids, load, call the monitor or the alerts."""

from celery import shared_task

from recovery import alerts, monitor
from recovery.models import HealthTransition


@shared_task
def run_health_checks_task() -> int:
    # Bridge's own services first, so a fresh install is watched from its first tick.
    monitor.ensure_builtin_services()
    checked = monitor.run_due_checks()
    monitor.prune_history_if_due()
    return checked


@shared_task
def send_transition_alert_task(transition_id: int) -> int:
    transition = HealthTransition.objects.select_related("service").filter(pk=transition_id)
    transition = transition.first()
    if transition is None:
        return 0
    return sum(alert.delivered for alert in alerts.send_transition_alert(transition))
