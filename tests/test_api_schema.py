"""The OpenAPI document: complete, typed, valid, and browsable for a signed-in session."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from drf_spectacular.drainage import reset_generator_stats
from jsonschema import Draft7Validator
from rest_framework.test import APIClient

SCHEMA = "/api/schema/"
DOCS = "/api/docs/"
EXPECTED_PATHS = {
    "/api/security/auth/login": "post",
    "/api/security/auth/refresh": "post",
    "/api/security/auth/logout": "post",
    "/api/compliance/audit/events": "get",
    "/api/compliance/audit/verify": "get",
    "/api/compliance/audit/log": "post",
    "/api/compliance/audit/events/{id}": "get",
    "/api/compliance/audit/verifications": "get",
    "/api/jobs": "get",
    "/api/jobs/{id}": "get",
    "/api/jobs/{id}/cancel": "post",
    "/api/security/status": "get",
    "/api/security/test": "post",
    "/api/security/reset": "post",
    "/api/recovery/retry-stats": "get",
    "/api/recovery/test-retry": "post",
    "/api/recovery/circuit-breaker/{service}/reset": "post",
    "/api/recovery/heal/{service}": "post",
    "/api/recovery/reset": "delete",
    "/api/recovery/services": "post",
    "/api/recovery/services/{service}": "patch",
    "/api/recovery/health/{service}": "get",
    "/api/recovery/status": "get",
    "/api/backup/status": "get",
    "/api/backup/full": "post",
    "/api/backup/incremental": "post",
    "/api/backup/point-in-time": "post",
    "/api/backup/list": "get",
    "/api/backup/{backup_id}": "delete",
    "/api/backup/restore/{backup_id}": "post",
    "/api/backup/test": "post",
    "/api/backup/cleanup": "post",
    "/api/backup/restores/{id}": "get",
    "/api/compliance/gdpr/data-subject-request": "post",
    "/api/compliance/gdpr/data-subject-request/{id}": "get",
    "/api/compliance/gdpr/data-subject-request/{id}/hold": "post",
    "/api/compliance/gdpr/data-subject-request/{id}/verify": "post",
    "/api/compliance/gdpr/data-subject-request/{id}/extend": "post",
    "/api/compliance/gdpr/data-subject-request/{id}/reject": "post",
    "/api/compliance/gdpr/data-subject-request/{id}/retry": "post",
    "/api/compliance/gdpr/data-subject-request/{id}/export": "get",
    "/api/compliance/gdpr/notices": "post",
    "/api/compliance/gdpr/consent/{subject_id}": "put",
    "/api/compliance/gdpr/consent/{subject_id}/receipt": "get",
    "/api/compliance/status": "get",
    "/api/compliance/metrics": "get",
    "/api/compliance/test": "post",
    "/api/compliance/violations": "get",
    "/api/compliance/violations/{id}": "get",
    "/api/compliance/reports/generate": "post",
    "/api/compliance/reports/list": "get",
    "/api/compliance/reports/{id}": "get",
    "/api/compliance/reports/{id}/download": "get",
    "/api/compliance/reports/{id}/manifest": "get",
    "/api/compliance/reports/{id}/signature": "get",
    "/api/compliance/retention/legal-holds": "post",
    "/api/compliance/retention/legal-holds/{id}": "get",
    "/api/compliance/retention/legal-holds/{id}/release": "post",
    "/api/compliance/retention/plan": "get",
    "/api/compliance/retention/run": "post",
    "/api/compliance/retention/purges": "get",
    "/api/compliance/sox/changes": "get",
    "/api/compliance/sox/changes/{id}": "get",
    "/api/compliance/approvals": "get",
    "/api/compliance/approvals/{id}": "get",
    "/api/compliance/approvals/{id}/approve": "post",
    "/api/compliance/approvals/{id}/reject": "post",
    "/api/compliance/approvals/{id}/cancel": "post",
    "/api/security/keys/rotate": "post",
}
# Operations whose POST is the whole request: nothing to send.
BODYLESS_POSTS = {
    "/api/security/auth/logout",
    "/api/compliance/audit/verify",
    "/api/jobs/{id}/cancel",
    "/api/security/test",
    "/api/security/reset",
    "/api/recovery/circuit-breaker/{service}/reset",
    "/api/compliance/test",
    "/api/compliance/retention/legal-holds/{id}/release",
    "/api/compliance/approvals/{id}/cancel",
}
# Downloads answer with the file itself (a ZIP), documented as binary instead of JSON.
BINARY_DOWNLOADS = {"/api/compliance/gdpr/data-subject-request/{id}/export"}
PUBLIC_OPERATIONS = {"/api/security/auth/login", "/api/security/auth/refresh"}
HTTP_METHODS = {"get", "put", "patch", "post", "delete", "head", "options", "trace"}


def _operations(document: dict) -> list[tuple[str, str, dict]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


@pytest.fixture
def schema(admin_api) -> dict:
    response = admin_api.get(SCHEMA, HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    return json.loads(response.content)


@pytest.mark.django_db
def test_schema_is_an_openapi_3_document_with_every_api_path(schema):
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "Bridge API"
    for path, method in EXPECTED_PATHS.items():
        assert method in schema["paths"].get(path, {}), f"{method.upper()} {path} is missing"


@pytest.mark.django_db
def test_schema_can_also_be_asked_for_with_a_format_parameter(admin_api):
    response = admin_api.get(SCHEMA, {"format": "json"})
    assert response.status_code == 200
    assert set(EXPECTED_PATHS) <= set(json.loads(response.content)["paths"])


@pytest.mark.django_db
def test_every_operation_documents_a_typed_success_response(schema):
    for path, method, operation in _operations(schema):
        responses = operation.get("responses")
        assert responses, f"{method.upper()} {path} documents no responses"
        success = [code for code in responses if code.startswith("2")]
        assert success, f"{method.upper()} {path} documents no 2xx response"
        for code in success:
            content = responses[code].get("content", {})
            if path in BINARY_DOWNLOADS:
                assert content and all(media.get("schema") for media in content.values()), (
                    f"{method.upper()} {path} {code} documents no file type"
                )
                continue
            assert content.get("application/json", {}).get("schema"), (
                f"{method.upper()} {path} {code} has no JSON schema"
            )


@pytest.mark.django_db
def test_every_post_but_logout_documents_a_typed_request_body(schema):
    posts = [(path, op) for path, method, op in _operations(schema) if method == "post"]
    assert {path for path, _ in posts} >= {p for p, m in EXPECTED_PATHS.items() if m == "post"}
    for path, operation in posts:
        if path in BODYLESS_POSTS:
            assert "requestBody" not in operation
            continue
        body = operation.get("requestBody")
        assert body and body.get("required") is True, f"POST {path} has no required body"
        assert body["content"]["application/json"]["schema"], f"POST {path} body is untyped"


@pytest.mark.django_db
def test_schema_components_resolve(schema):
    raw = json.dumps(schema)
    components = schema["components"]["schemas"]
    for name in ("TokenPair", "AuditEvent", "PaginatedAuditEventList", "LogoutResult"):
        assert name in components
        assert f'"#/components/schemas/{name}"' in raw


@pytest.mark.django_db
def test_protected_operations_declare_the_bearer_token_they_need(schema):
    # The API authenticates with JWT bearer tokens; a client generated from the schema must
    # be told so, and public operations (login, refresh) must not demand a token.
    schemes = schema.get("components", {}).get("securitySchemes", {})
    bearer = {name for name, s in schemes.items() if s.get("scheme") == "bearer"}
    missing = []
    for path, method, operation in _operations(schema):
        required = {name for req in operation.get("security", []) for name in req}
        if path in PUBLIC_OPERATIONS:
            assert {} in operation.get("security", [{}]), f"{path} should allow anonymous"
        elif not required & bearer:
            missing.append(f"{method.upper()} {path}")
    assert missing == []


@pytest.mark.django_db
def test_schema_is_not_served_to_anonymous_callers(anon_api):
    response = anon_api.get(SCHEMA, {"format": "json"})
    assert response.status_code == 401


@pytest.mark.django_db
def test_swagger_ui_is_served_as_html_to_a_signed_in_session(admin_user):
    # given
    client = APIClient()
    client.force_login(admin_user)
    # when
    response = client.get(DOCS)
    # then
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "swagger-ui" in page.lower()
    # the start-up script comes from its own address (script-src 'self' under the CSP)
    script = client.get(DOCS, {"script": ""})
    assert script.status_code == 200
    assert SCHEMA in script.content.decode()


@pytest.mark.django_db
def test_spectacular_validates_the_schema_without_warnings(tmp_path, capsys):
    # given a clean slate: drf-spectacular keeps warnings process-wide between generations
    reset_generator_stats()
    target = tmp_path / "schema.yaml"
    # when
    try:
        call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    finally:
        reset_generator_stats()
    # then
    assert target.read_text().startswith("openapi: 3.")


# --- Refusals: documented where they can occur, and shaped as documented --------------------


def _documented(schema: dict, path: str, method: str) -> dict:
    return schema["paths"][path][method]["responses"]


@pytest.mark.django_db
def test_every_operation_documents_the_refusals_it_can_give(schema):
    # drf-spectacular documents what a view declares; bridge.schema adds what the layers
    # around it answer (authentication, permissions, validation, routing, paging, the trail)
    for path, method, operation in _operations(schema):
        responses = set(operation["responses"])
        parameters = operation.get("parameters", [])
        label = f"{method.upper()} {path}"
        assert {"500", "503"} <= responses, label
        if path not in PUBLIC_OPERATIONS:
            assert {"401", "403"} <= responses, label
        if "requestBody" in operation or any(p["in"] == "query" for p in parameters):
            assert "400" in responses, label
        if any(p["in"] == "path" for p in parameters) or any(
            p["name"] == "page" for p in parameters
        ):
            assert "404" in responses, label
        for code in responses - {"200", "201", "202"}:
            assert operation["responses"][code]["content"]["application/json"]["schema"], (
                f"{label} {code} has no JSON schema"
            )


@pytest.mark.django_db
def test_the_login_lockout_documents_when_to_come_back(schema):
    locked = _documented(schema, "/api/security/auth/login", "post")["429"]
    assert locked["headers"]["Retry-After"]["required"] is True
    assert locked["headers"]["Retry-After"]["schema"]["type"] == "integer"


@pytest.mark.django_db
def test_paging_and_filter_parameters_carry_the_limits_bridge_enforces(schema):
    parameters = {
        p["name"]: p["schema"]
        for p in schema["paths"]["/api/compliance/audit/events"]["get"]["parameters"]
    }
    assert parameters["page"]["minimum"] == 1
    assert (parameters["page_size"]["minimum"], parameters["page_size"]["maximum"]) == (1, 500)
    assert (parameters["actor"]["minLength"], parameters["actor"]["maxLength"]) == (1, 150)
    assert (parameters["action"]["minLength"], parameters["action"]["maxLength"]) == (1, 64)
    assert parameters["from"]["format"] == "date-time"


@pytest.fixture
def refusals(anon_api, outsider_api, compliance_api) -> dict:
    return {"anonymous": anon_api, "outsider": outsider_api, "compliance": compliance_api}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("who", "method", "path", "template", "data", "status"),
    [
        ("anonymous", "get", "/api/jobs", "/api/jobs", None, 401),
        ("outsider", "get", "/api/compliance/audit/events", None, None, 403),
        ("compliance", "get", "/api/compliance/audit/events", None, {"page": "0"}, 400),
        ("compliance", "get", "/api/compliance/audit/events", None, {"page": "999"}, 404),
        ("compliance", "get", "/api/jobs/999999", "/api/jobs/{id}", None, 404),
        ("compliance", "get", "/api/compliance/audit/verify", None, None, 404),
        ("anonymous", "post", "/api/security/auth/login", None, {"username": "x"}, 400),
        ("anonymous", "post", "/api/security/auth/login", None, "{not json", 400),
        ("anonymous", "post", "/api/security/auth/refresh", None, {"refresh": "x.y.z"}, 401),
    ],
)
def test_refusals_match_the_schemas_documented_for_them(
    schema, refusals, who, method, path, template, data, status
):
    # given
    client = refusals[who]
    # when
    if data == "{not json":
        response = client.post(path, data, content_type="application/json")
    elif method == "get":
        response = client.get(path, data or {})
    else:
        response = client.post(path, data, format="json")
    # then: the status is documented for the operation, and the body matches its schema
    assert response.status_code == status, response.content
    documented = _documented(schema, template or path, method)[str(status)]
    body_schema = documented["content"]["application/json"]["schema"]
    # $refs point into the document's components: validate against a root that has them
    validator = Draft7Validator({**body_schema, "components": schema["components"]})
    errors = [error.message for error in validator.iter_errors(response.json())]
    assert errors == [], f"{response.json()} does not match {body_schema}"
