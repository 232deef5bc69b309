"""OpenAPI postprocessing: the schema documents every answer an operation can give.

drf-spectacular documents what a view declares: its success response and the refusals the view
names itself. The refusals that come from the layers around the view (authentication,
permissions, validation, routing, paging, the audit trail) are added here, so that a client
generated from the schema, and the schema fuzz test (tests/test_schema_fuzz.py), know every
status and body shape they can meet. Filter parameters get the length limits their filters
enforce, so that a value the schema allows is a value Bridge accepts (NUL characters and
surrounding whitespace aside: DRF refuses and trims them in every text field).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.generators import SchemaGenerator

HTTP_METHODS = {"get", "put", "patch", "post", "delete", "head", "options", "trace"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# The body shapes of refusals. They stay open (no additionalProperties: false): some carry
# more, such as `path` on an unknown address, `request_id` on a 500 or 503, or simplejwt's
# `messages` on a rejected token.
COMPONENTS: dict[str, dict[str, Any]] = {
    "Refusal": {
        "type": "object",
        "description": (
            "A refusal: `detail` for people, `code` for programs (not_authenticated, "
            "token_not_valid, token_revoked, permission_denied, not_found, parse_error, "
            "locked_out, server_error, ...)."
        ),
        "properties": {
            "detail": {"anyOf": [{"type": "string"}, {"type": "object"}]},
            "code": {"type": "string"},
        },
        "required": ["detail", "code"],
    },
    "ValidationErrors": {
        "type": "object",
        "description": (
            "Invalid input, keyed by the field or query parameter at fault "
            "(`non_field_errors` for the document as a whole); each value is a list of "
            "messages, or the same structure again for a nested field."
        ),
        "additionalProperties": {
            "anyOf": [
                {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object"}]}},
                {"type": "object"},
            ]
        },
        "minProperties": 1,
    },
    "AuditUnavailable": {
        "type": "object",
        "description": "The request's audit event could not be written, so it was not served.",
        "properties": {
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "request_id": {"type": "string"},
        },
        "required": ["detail", "code", "request_id"],
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


INVALID_INPUT = {"anyOf": [_ref("Refusal"), _ref("ValidationErrors")]}
RETRY_AFTER = {
    "description": "Seconds until a request may succeed (the lockout, limit or ban ends).",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}


def _possible_errors(path: str, operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The error responses the layers around a view can give for this operation."""
    security = operation.get("security") or [{}]
    authenticated = {} not in security
    parameters = operation.get("parameters", [])
    query = any(p.get("in") == "query" for p in parameters)
    in_path = any(p.get("in") == "path" for p in parameters)
    paginated = any(p.get("in") == "query" and p.get("name") == "page" for p in parameters)
    errors: dict[str, dict[str, Any]] = {}
    if query or "requestBody" in operation:
        errors["400"] = _json(
            INVALID_INPUT, "Invalid input: the fields or parameters at fault, or a parse error."
        )
    if "requestBody" in operation:
        errors["413"] = _json(_ref("Refusal"), "The request body is larger than Bridge accepts.")
    if authenticated:
        errors["401"] = _json(
            _ref("Refusal"),
            "Not authenticated: no credentials, or a token that is invalid, expired or revoked.",
        )
        errors["403"] = _json(
            _ref("Refusal"),
            "Authenticated, but without the permission this operation needs "
            "(or a console session without its CSRF token).",
        )
    if paginated:
        # A page past the end names the parameter, like a validation error does.
        errors["404"] = _json(INVALID_INPUT, "No such object, or a page past the last one.")
    elif in_path:
        errors["404"] = _json(_ref("Refusal"), "No such object, or none you may see.")
    errors["500"] = _json(
        _ref("Refusal"), "An unexpected error; `request_id` names it in the server's log."
    )
    if path.startswith("/api/"):
        errors["429"] = _json(
            _ref("Refusal"),
            "Too many requests (`rate_limited`, per address and endpoint class), or the address "
            "is banned for a while (`ip_banned`); Retry-After says when to come back.",
        )
        errors["503"] = _json(
            {"anyOf": [_ref("AuditUnavailable"), _ref("Refusal")]},
            "The audit trail is unavailable: Bridge refuses to serve a request it cannot record "
            "(or, for login, the rate limiter's store does not answer: `limiter_unavailable`).",
        )
    return errors


def _filter_limits(generator: SchemaGenerator) -> dict[tuple[str, str], dict[str, int | None]]:
    """The filter parameters of each (schema path, method), with their max length if any."""
    limits: dict[tuple[str, str], dict[str, int | None]] = {}
    for path, _regex, method, callback in generator.endpoints or []:
        filterset = getattr(getattr(callback, "cls", None), "filterset_class", None)
        if filterset is None:
            continue
        view = generator.create_view(callback, method)
        limits[(generator.coerce_path(path, method, view), method.lower())] = {
            name: field.extra.get("max_length") for name, field in filterset.base_filters.items()
        }
    return limits


def _bound_filter_parameter(parameter: dict[str, Any], max_length: int | None) -> None:
    schema = parameter.setdefault("schema", {})
    if schema.get("type") != "string" or "enum" in schema or "format" in schema:
        return
    # bridge.api.FilterBackend refuses a blank filter value (leave the parameter out instead).
    schema["minLength"] = 1
    if max_length:
        schema["maxLength"] = max_length


def add_error_responses(
    result: dict[str, Any], generator: SchemaGenerator, **kwargs: Any
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the refusals every operation can give, and the
    length limits of filter parameters (at least 1, at most the filter's max_length)."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in COMPONENTS.items():
        schemas.setdefault(name, schema)
    limits = _filter_limits(generator)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            filters = limits.get((path, method), {})
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "query" and parameter.get("name") in filters:
                    _bound_filter_parameter(parameter, filters[parameter["name"]])
            responses = operation.setdefault("responses", {})
            # What the view declared itself stays: it knows its own refusals best.
            for status, response in _possible_errors(path, operation).items():
                responses.setdefault(status, response)
            if "429" in responses:
                # Every 429 (limits, bans, the login lockout) says when to come back.
                responses["429"].setdefault("headers", {})["Retry-After"] = RETRY_AFTER
    return result
