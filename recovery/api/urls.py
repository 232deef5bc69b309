from django.urls import path  # each area of recovery adds its routes below

# The seven endpoints of the seed's Stage 3A and the services CRUD, {service} being a name.
urlpatterns: list = []

# Self-healing (recovery/api/healing.py).
from recovery.api import healing as _healing  # noqa: E402

urlpatterns += [
    path(
        "heal/<str:service>",
        _healing.HealViewSet.as_view({"post": "heal"}),
        name="recovery-heal",
    ),
    path("reset", _healing.HealViewSet.as_view({"delete": "reset"}), name="recovery-reset"),
]

# Services and health (recovery/api/services.py).
from recovery.api import services as _services  # noqa: E402

urlpatterns += [
    path(
        "services",
        _services.ServiceViewSet.as_view({"get": "list", "post": "create"}),
        name="recovery-services",
    ),
    path(
        "services/<slug:service>",
        _services.ServiceViewSet.as_view(
            {"get": "retrieve", "patch": "partial_update", "delete": "destroy"}
        ),
        name="recovery-service",
    ),
    path(
        "health/<slug:service>",
        _services.HealthViewSet.as_view({"get": "health"}),
        name="recovery-health",
    ),
    path("status", _services.HealthViewSet.as_view({"get": "overview"}), name="recovery-status"),
]

# Retries and circuit breakers (recovery/api/resilience.py).
from recovery.api import resilience as _resilience  # noqa: E402

urlpatterns += [
    path(
        "retry-stats",
        _resilience.ResilienceViewSet.as_view({"get": "retry_stats"}),
        name="recovery-retry-stats",
    ),
    path(
        "test-retry",
        _resilience.ResilienceViewSet.as_view({"post": "test_retry"}),
        name="recovery-test-retry",
    ),
    path(
        "circuit-breaker/<str:service>/reset",
        _resilience.ResilienceViewSet.as_view({"post": "reset_breaker"}),
        name="recovery-breaker-reset",
    ),
]
