"""GDPR routes: data-subject requests (compliance/dsr.py) and consent (compliance/consent.py)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []

# Consent and privacy notices (compliance/api/consent_views.py). The subject id is one path
# segment: 1-128 characters, no control characters, no "/" (consent.SUBJECT_ID_PATTERN).
from django.urls import path, re_path  # noqa: E402

from compliance.api import consent_views as _consent  # noqa: E402
from compliance.consent import SUBJECT_ID_PATTERN as _SUBJECT  # noqa: E402

urlpatterns += [
    path(
        "gdpr/notices",
        _consent.NoticeViewSet.as_view({"get": "list", "post": "create"}),
        name="gdpr-notices",
    ),
    re_path(
        rf"^gdpr/consent/(?P<subject_id>{_SUBJECT})/receipt$",
        _consent.ConsentViewSet.as_view({"get": "receipt"}),
        name="gdpr-consent-receipt",
    ),
    re_path(
        rf"^gdpr/consent/(?P<subject_id>{_SUBJECT})$",
        _consent.ConsentViewSet.as_view({"get": "retrieve", "put": "update"}),
        name="gdpr-consent",
    ),
]

# Data subject requests (compliance/api/dsr_views.py); ids are UUIDs.
from compliance.api import dsr_views as _dsr  # noqa: E402

_DSR = "gdpr/data-subject-request"
urlpatterns += [
    path(
        _DSR,
        _dsr.DataSubjectRequestViewSet.as_view({"get": "list", "post": "create"}),
        name="dsr-list",
    ),
    path(
        f"{_DSR}/<uuid:id>",
        _dsr.DataSubjectRequestViewSet.as_view({"get": "retrieve"}),
        name="dsr-detail",
    ),
    *(
        path(
            f"{_DSR}/<uuid:id>/{action}",
            _dsr.DataSubjectRequestViewSet.as_view({"post": action}),
            name=f"dsr-{action}",
        )
        for action in ("hold", "verify", "extend", "reject", "retry")
    ),
    path(
        f"{_DSR}/<uuid:id>/export",
        _dsr.DataSubjectRequestViewSet.as_view({"get": "export"}),
        name="dsr-export",
    ),
]
