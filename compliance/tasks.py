from celery import shared_task

from compliance import services


@shared_task
def seal_audit_chain_task(sweep: bool = False) -> int:
    return services.seal_all_pending(sweep=sweep)


@shared_task
def verify_audit_chain_task() -> int:
    from compliance.choices import VerificationSource

    return services.verify_chain(source=VerificationSource.SCHEDULE).pk
