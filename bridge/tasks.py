from celery import shared_task

from bridge import jobs


@shared_task
def reap_stale_jobs_task() -> int:
    return jobs.reap_stale_jobs()
