"""Every response matches the published OpenAPI schema, and no input produces a 500.

schemathesis builds requests from the schema Bridge serves at /api/schema/, for every operation
and as every persona (anonymous, superuser, each role, a user with no role): its coverage
phase (boundary values, missing and mistyped fields, methods no operation declares), then
hypothesis-generated valid (positive) and invalid (negative) ones. Each goes to Bridge under
gunicorn on PostgreSQL, and each answer is checked: not a server error; a documented status,
content type, headers and body; invalid input refused with a 4xx; an undeclared method answered
405 with Allow; authentication enforced (the same request without credentials, and with invalid
ones, is refused).

Budget: about two minutes on a 2-core CI machine. `BRIDGE_FUZZ_EXAMPLES` (generated cases per
operation, persona and mode) and `BRIDGE_FUZZ_SEED` change the run; the defaults are fixed, so
CI sends the same requests every time. Run it alone with `pytest -m fuzz` (PostgreSQL: set
DATABASE_URL and BRIDGE_SERVER_TESTS=1, or BRIDGE_REQUIRE_SERVICES=1 as CI does). The other
tests here are the regressions the fuzz found, on any database.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.generation.drivers import CoverageGenerator
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.generation.overrides import Override
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from bridge import jobs
from bridge.choices import JobStatus
from bridge.jobs import run_job
from bridge.models import Job
from compliance.audit import AuditContext
from compliance.choices import VerificationSource
from compliance.models import AuditEvent
from compliance.verification import start_verification, verify_chain_job
from security.choices import Role
from tests.conftest import PASSWORD, make_user

MAX_EXAMPLES = int(os.environ.get("BRIDGE_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("BRIDGE_FUZZ_SEED", "20260601"))

EVENTS = "/api/compliance/audit/events"
JOBS = "/api/jobs"
LOG = "/api/compliance/audit/log"
LOGIN = "POST /api/security/auth/login"
REFRESH = "POST /api/security/auth/refresh"
LOGOUT = "POST /api/security/auth/logout"


# --- The fuzz run (PostgreSQL, a real server) ----------------------------------------------


@dataclass(frozen=True)
class Persona:
    name: str
    roles: tuple[Role, ...] = ()
    superuser: bool = False
    anonymous: bool = False

    @property
    def username(self) -> str:
        # Distinctive, so that no generated login (a wrong password, counted by the lockout)
        # ever names a persona; the login cases naming one are dropped besides.
        return f"fuzz-persona-{self.name}"


PERSONAS = (
    Persona("anonymous", anonymous=True),
    Persona("superuser", superuser=True),
    Persona("operator", (Role.OPERATOR,)),
    Persona("security_officer", (Role.SECURITY_OFFICER,)),
    Persona("compliance_officer", (Role.COMPLIANCE_OFFICER,)),
    Persona("no_role"),
)
ANONYMOUS, SUPERUSER = PERSONAS[0], PERSONAS[1]
PERSONA_USERNAMES = {persona.username for persona in PERSONAS}

HYPOTHESIS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    # Seeded per operation, persona and mode (_seed) rather than derandomized, so that the
    # personas do not all get the very same inputs; no example database: a run is a function
    # of the seed alone.
    derandomize=False,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=True,
    print_blob=False,
    verbosity=Verbosity.normal,
)

# gunicorn refuses a request line over 4094 bytes or a header line over 8190 (its defaults)
# with its own HTML 414 or 400 before Bridge sees the request: such cases would test gunicorn.
REQUEST_LINE_LIMIT = 4094
HEADER_LINE_LIMIT = 8190


def _config(generated_credentials: bool) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Anonymous cases carry generated (so invalid) bearer tokens and session cookies,
            # which fuzzes the authenticators; a persona's cases carry its own token, and a
            # generated one beside it would only be overridden.
            "generation": {"with-security-parameters": generated_credentials},
            # A rejection is a 4xx: a 5xx never counts as refusing invalid input
            # (schemathesis' default list accepts it, leaving it to not_a_server_error alone).
            "checks": {
                "negative_data_rejection": {
                    "expected-statuses": [
                        "400",
                        "401",
                        "403",
                        "404",
                        "405",
                        "409",
                        "413",
                        "415",
                        "429",
                    ]
                }
            },
        }
    )


def _seed(*parts: str) -> int:
    return zlib.crc32(":".join((str(SEED), *parts)).encode())


def _reaches_bridge(case: Case, url: str, headers: dict[str, str]) -> bool:
    sent = case.as_transport_kwargs(base_url=url, headers=headers)
    prepared = requests.Request(
        method=sent["method"], url=sent["url"], params=sent.get("params"), headers=sent["headers"]
    ).prepare()
    line = f"{prepared.method} {prepared.path_url} HTTP/1.1"
    return len(line.encode()) <= REQUEST_LINE_LIMIT and all(
        len(f"{name}: {value}".encode("latin-1", "replace")) <= HEADER_LINE_LIMIT
        for name, value in prepared.headers.items()
    )


def _not_a_persona(case: Case) -> bool:
    username = case.body.get("username") if isinstance(case.body, dict) else None
    return not (isinstance(username, str) and username in PERSONA_USERNAMES)


def _probes_once(enforced: set[str]) -> Callable[[CheckContext, Response, Case], bool | None]:
    """schemathesis' ignored_auth, probing each operation once per persona, not per case.

    Outside schemathesis' own runner the check re-sends every successful authenticated request
    without credentials and with invalid ones; once an operation has refused both, the answer
    will not change with the next input, and the budget is better spent on new inputs.
    """

    def ignored_auth_once(ctx: CheckContext, response: Response, case: Case) -> bool | None:
        ctx.auth_enforced_operations = enforced
        return ignored_auth(ctx, response, case)

    ignored_auth_once.__name__ = "ignored_auth"
    return ignored_auth_once


@dataclass
class Plan:
    """What is sent for one operation: the coverage cases, and a strategy per mode."""

    operation: Any
    coverage: list[Case]
    strategies: dict[GenerationMode, Any]


def _with_known_ids(base: Any, ids: list[int]) -> Any:
    """Cases aimed at objects that exist as well, so that 200 answers get checked too."""

    @st.composite
    def aimed(draw: st.DrawFn) -> Case:
        case = draw(base)
        case.path_parameters = {**case.path_parameters, "id": draw(st.sampled_from(ids))}
        return case

    return st.one_of(base, aimed())


def _plans(schema: Any, known_ids: dict[str, list[int]]) -> list[Plan]:
    plans = []
    for result in schema.get_all_operations():
        operation = result.ok()
        coverage = CoverageGenerator(
            operation=operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=schema.config.generation_for(operation=operation, phase="coverage"),
            auth_storage=None,
            override=Override(),
            feedback=FeedbackSources(),
        )
        strategies = {}
        has_input = bool(len(operation.path_parameters) or len(operation.query) or operation.body)
        # An operation without input has no invalid form: its negative mode generates nothing.
        for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * has_input:
            strategy = operation.as_strategy(generation_mode=mode)
            if operation.label == LOGIN:
                strategy = strategy.filter(_not_a_persona)
            ids = known_ids.get(operation.path)
            if ids and mode == GenerationMode.POSITIVE:
                strategy = _with_known_ids(strategy, ids)
            strategies[mode] = strategy
        plans.append(Plan(operation, [c for c in coverage if _not_a_persona(c)], strategies))
    return plans


@dataclass
class Run:
    """The fuzz run's state: the server, the personas' tokens, and what came back."""

    url: str
    schema: Any
    session: requests.Session = field(default_factory=requests.Session)
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)
    enforced: dict[str, set[str]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return sum(self.statuses.values())

    def headers(self, persona: Persona) -> dict[str, str]:
        if persona.anonymous:
            return {}
        return {"Authorization": f"Bearer {self.tokens[persona.name]['access']}"}

    def checks(self, persona: Persona) -> list[Callable]:
        return [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
            negative_data_rejection,
            missing_required_header,
            unsupported_method,
            _probes_once(self.enforced.setdefault(persona.name, set())),
        ]

    def send(self, persona: Persona, case: Case) -> Response:
        """Send one case as the persona and hold the answer to the schema."""
        headers = self.headers(persona)
        response = case.call(base_url=self.url, session=self.session, headers=headers, timeout=30)
        self.statuses[f"{response.status_code // 100}xx"] += 1
        self.by_operation[(case.operation.label, response.status_code)] += 1
        try:
            case.validate_response(
                response,
                checks=self.checks(persona),
                headers=headers,
                transport_kwargs={"base_url": self.url, "headers": headers, "timeout": 30},
            )
        finally:
            if case.operation.label == LOGOUT and response.status_code == 200:
                # Logout revokes every token of the persona: sign in again for what follows.
                self.sign_in(persona)
        return response

    def explicit(self, persona: Persona, label: str, **data: Any) -> Response:
        operation = self.schema.find_operation_by_label(label)
        return self.send(persona, operation.Case(media_type="application/json", **data))

    def sign_in(self, persona: Persona) -> None:
        """Log in, rotate once and present the spent token again, through the schema's
        operations (their 200 and 401 answers are checked too); then log in for good, since
        the reuse revoked the first session."""
        credentials = {"username": persona.username, "password": PASSWORD}
        first = self.explicit(ANONYMOUS, LOGIN, body=credentials)
        assert first.status_code == 200, f"{persona.username} cannot log in: {first.text}"
        spent = first.json()["refresh"]
        assert self.explicit(ANONYMOUS, REFRESH, body={"refresh": spent}).status_code == 200
        reused = self.explicit(ANONYMOUS, REFRESH, body={"refresh": spent})
        assert reused.status_code == 401, reused.text
        again = self.explicit(ANONYMOUS, LOGIN, body=credentials)
        assert again.status_code == 200, f"{persona.username} cannot log in: {again.text}"
        self.tokens[persona.name] = again.json()

    def record(self, persona: Persona, label: str, error: BaseException) -> None:
        notes = "\n".join(getattr(error, "__notes__", []))
        self.failures.append(f"--- {label} as {persona.name}\n{error}\n{notes}")

    def sweep(self, persona: Persona, plan: Plan) -> None:
        """The coverage phase: schemathesis' deterministic boundary and shape cases."""
        failed: set[str] = set()
        for case in plan.coverage:
            if not _reaches_bridge(case, self.url, self.headers(persona)):
                continue
            try:
                self.send(persona, case)
            # Every failure is reported, not only the first (FailureGroup is a
            # BaseExceptionGroup); one per kind of failure and operation is enough to read.
            except (Exception, BaseExceptionGroup) as error:
                kind = f"{type(error).__name__}: {' '.join(str(error).split()[:12])}"
                if kind not in failed:
                    failed.add(kind)
                    self.record(persona, f"{plan.operation.label} (coverage)", error)

    def fuzz(self, persona: Persona, plan: Plan) -> None:
        """The fuzzing phase: hypothesis-generated cases, shrunk to the simplest on failure."""
        for mode, strategy in plan.strategies.items():

            @HYPOTHESIS
            @hypothesis.seed(_seed(persona.name, plan.operation.label, mode.value))
            @hypothesis.given(case=strategy)
            def exercise(case: Case) -> None:
                hypothesis.assume(_reaches_bridge(case, self.url, self.headers(persona)))
                self.send(persona, case)

            try:
                exercise()
            except (Exception, BaseExceptionGroup) as error:
                self.record(persona, f"{plan.operation.label} ({mode.value})", error)


def _seed_objects() -> dict[str, list[int]]:
    """A finished verification and a pending one (whose cancel answers 202, then 409), and
    the ids that the detail operations should sometimes ask for."""
    done = start_verification(
        context=AuditContext.system(), source=VerificationSource.API, enqueue=False
    )
    run_job(done.pk, verify_chain_job)
    pending = start_verification(
        context=AuditContext.system(), source=VerificationSource.API, enqueue=False
    )
    events = list(AuditEvent.objects.order_by("id").values_list("id", flat=True)[:5])
    runs = [done.pk, pending.pk]
    return {
        f"{EVENTS}/{{id}}": events,
        "/api/compliance/audit/verifications/{id}": runs,
        f"{JOBS}/{{id}}": runs,
        f"{JOBS}/{{id}}/cancel": runs,
    }


def _finish_pending_jobs() -> int:
    """Run here the jobs the fuzz started: no worker serves this server, and a job no longer
    pending is a no-op for whichever worker receives its message later."""
    pending = list(Job.objects.filter(status=JobStatus.PENDING))
    for job in pending:
        spec = jobs.kind_of(job)
        if spec is not None:
            spec.task(job.pk)
    return len(pending)


def _summary(run: Run, plans: Iterable[Plan], seconds: float, finished_jobs: int) -> str:
    plans = list(plans)
    coverage = sum(len(plan.coverage) for plan in plans)
    lines = [
        f"schema fuzz: {len(plans)} operations x {len(PERSONAS)} personas; "
        f"{coverage} coverage cases per persona, then up to {MAX_EXAMPLES} generated cases per "
        f"operation, persona and mode (seed {SEED})",
        f"  {run.cases} requests checked in {seconds:.0f} s: "
        + ", ".join(f"{cls} {count}" for cls, count in sorted(run.statuses.items())),
        f"  jobs the fuzz started, run here afterwards: {finished_jobs}",
    ]
    for label in sorted({label for label, _ in run.by_operation}):
        statuses = sorted((s, n) for (op, s), n in run.by_operation.items() if op == label)
        lines.append(f"  {label}: " + ", ".join(f"{s} x{n}" for s, n in statuses))
    return "\n".join(lines)


@pytest.mark.services
@pytest.mark.servers
@pytest.mark.fuzz
def test_every_operation_answers_every_persona_as_its_schema_says(server, postgres, capsys):
    # given the personas, a finished and a pending verification, and the published schema
    for persona in PERSONAS[1:]:
        make_user(persona.username, *persona.roles, superuser=persona.superuser)
    started = time.monotonic()
    login = requests.post(
        f"{server}/api/security/auth/login",
        json={"username": SUPERUSER.username, "password": PASSWORD},
        timeout=30,
    )
    assert login.status_code == 200, login.text
    schemas = {
        anonymous: schemathesis.openapi.from_url(
            f"{server}/api/schema/?format=json",
            headers={"Authorization": f"Bearer {login.json()['access']}"},
            config=_config(generated_credentials=anonymous),
        )
        for anonymous in (True, False)
    }
    run = Run(url=server, schema=schemas[False])
    for persona in PERSONAS[1:]:
        run.sign_in(persona)
    known_ids = _seed_objects()
    plans = {anonymous: _plans(schemas[anonymous], known_ids) for anonymous in schemas}

    # when every operation is swept and fuzzed as every persona
    for persona in PERSONAS:
        for plan in plans[persona.anonymous]:
            run.sweep(persona, plan)
            run.fuzz(persona, plan)
    finished = _finish_pending_jobs()
    run.explicit(SUPERUSER, f"GET {JOBS}", query={"page_size": 500})  # the finished jobs

    # then every answer was within the schema, and none was a server error
    with capsys.disabled():
        print("\n" + _summary(run, plans[False], time.monotonic() - started, finished))
    assert not run.failures, f"{len(run.failures)} failures\n\n" + "\n\n".join(run.failures)
    assert run.statuses["5xx"] == 0


# --- Regressions the fuzz found (any database, Django's test client) ------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query", [{"page": ""}, {"page_size": ""}, {"page": " 2"}, {"page_size": "1_0"}, {"page": "٣"}]
)
def test_a_blank_or_loosely_written_page_number_is_refused_naming_it(compliance_api, query):
    # int() alone takes " 2", "1_0" and other scripts' digits, and a blank value was read as
    # "the default", so that a request the schema calls invalid (not an integer) got a 200
    response = compliance_api.get(EVENTS, query)
    assert response.status_code == 400
    assert "whole number" in response.json()[next(iter(query))][0]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "query"), [(JOBS, "status"), (JOBS, "kind"), (EVENTS, "actor")])
def test_a_blank_filter_parameter_is_refused_naming_it(compliance_api, path, query):
    # django-filter reads `?status=` as "no filter", so a value outside the enum got a 200
    response = compliance_api.get(path, {query: ""})
    assert response.status_code == 400
    assert "blank" in response.json()[query][0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (LOG, {"action": "x", "object_type": 5}, "object_type"),
        (LOG, {"action": 99}, "action"),
        (LOG, {"action": "x", "object_id": 1.5}, "object_id"),
        ("/api/security/auth/login", {"username": 123, "password": "x"}, "username"),
        ("/api/security/auth/refresh", {"refresh": 42}, "refresh"),
    ],
)
def test_a_number_where_the_schema_wants_text_is_refused(operator_api, path, body, field):
    # DRF's CharField stores a number's text, so the schema's "type: string" was not enforced
    response = operator_api.post(path, body, format="json")
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "moment", ["2026-01-31", "2026-01-31T12:00:00", "2026-01-31 12:00:00Z", " 2026-01-31T12:00Z"]
)
def test_a_time_filter_without_its_offset_or_not_in_rfc_3339_form_is_refused(
    compliance_api, moment
):
    # the schema says format: date-time (RFC 3339); a bare date or a time without offset was
    # read in the server's zone, which is ambiguous in an audit query
    response = compliance_api.get(EVENTS, {"from": moment})
    assert response.status_code == 400
    assert "RFC 3339" in response.json()["from"][0]


@pytest.mark.django_db
def test_a_time_filter_is_read_in_utc_whatever_its_offset(compliance_api):
    # PostgreSQL takes offsets up to 15:59 only: a valid RFC 3339 "-16:59" passed through was
    # a 500 there (the fuzz found it); converted to UTC first it is an ordinary moment
    from datetime import UTC, datetime

    from compliance.filters import UTCDateTimeField

    moment = UTCDateTimeField().clean("2026-01-31T00:00:00-16:59")
    assert moment == datetime(2026, 1, 31, 16, 59, tzinfo=UTC)
    assert moment.utcoffset().total_seconds() == 0
    response = compliance_api.get(EVENTS, {"from": "2000-01-31T00:00:00-16:59"})
    assert response.status_code == 200
    assert response.json()["count"] >= 1


@pytest.mark.django_db
@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_time_filter_outside_the_calendar_once_in_utc_is_refused(compliance_api, moment):
    # converting such a moment to UTC overflows datetime: it is invalid input, not a 500
    response = compliance_api.get(EVENTS, {"to": moment})
    assert response.status_code == 400
    assert "to" in response.json()


@pytest.mark.django_db
def test_a_post_to_an_unknown_api_path_is_a_json_404_not_a_csrf_page(compliance_officer):
    # /api/jobs/0.5/cancel matches no route (the router's ids have no dot); the catch-all 404
    # view is a plain Django view, so CsrfViewMiddleware answered its POST with an HTML 403
    from rest_framework.test import APIClient

    from tests.conftest import login

    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {login(client, 'carla')['access']}")
    response = client.post(f"{JOBS}/0.5/cancel")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["code"] == "not_found"
