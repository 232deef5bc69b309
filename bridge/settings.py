"""Bridge settings: everything comes from the environment, with safe embedded defaults.

Defaults need nothing but Python (SQLite and Celery's filesystem broker under var/). Production
sets DEBUG=false plus DATABASE_URL, CELERY_BROKER_URL, SECRET_KEY and ALLOWED_HOSTS; the
README's configuration table lists every variable.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from bridge.env import env_bool, env_duration, env_int, env_json, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("BRIDGE_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# --- Core ---------------------------------------------------------------------------------
PRODUCTION = env_str("BRIDGE_ENV", "development") == "production"
DEBUG = env_bool("DEBUG", not PRODUCTION)
# `make run` (bin/run) on a workstation: DEBUG off like production, but on the generated key
# and the local host names, over plain http. Never in production, whatever the environment says.
LOCAL_RUN = env_bool("BRIDGE_LOCAL_RUN", False) and not PRODUCTION
_DEV_KEY_FILE = VAR_DIR / "dev_secret_key"
_LOCAL_HOSTS = "localhost,127.0.0.1,[::1]"


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        if len(key) < 32:
            raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters long")
        return key
    if not (DEBUG or LOCAL_RUN):
        raise ImproperlyConfigured(
            "SECRET_KEY is not set: with DEBUG off Bridge refuses to start on a default key"
        )
    # Development and `make run` only: one random key per var dir, shared by web, worker, beat.
    if not _DEV_KEY_FILE.exists():
        tmp = _DEV_KEY_FILE.with_suffix(".tmp")
        tmp.write_text(secrets.token_urlsafe(50))
        tmp.chmod(0o600)
        tmp.replace(_DEV_KEY_FILE)
    return _DEV_KEY_FILE.read_text().strip()


SECRET_KEY = _secret_key()
if DEBUG:
    ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", f"{_LOCAL_HOSTS},testserver")
else:
    ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", _LOCAL_HOSTS if LOCAL_RUN else "")
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is empty: with DEBUG off set the served host names")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

try:
    TRUSTED_PROXIES = [
        ipaddress.ip_network(cidr, strict=False) for cidr in env_list("TRUSTED_PROXIES")
    ]
except ValueError as exc:
    raise ImproperlyConfigured(f"TRUSTED_PROXIES: {exc}") from exc

INSTALLED_APPS = [
    # unfold's templates must be found before django.contrib.admin's. Its basic config: the
    # default one would replace admin.site with a plain UnfoldAdminSite, not Bridge's console.
    "unfold.apps.BasicAppConfig",
    "unfold.contrib.filters",
    "bridge.apps.BridgeAdminConfig",
    "bridge.apps.BridgeConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_filters",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    # Two-factor login (security/otp.py): TOTP authenticators.
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_celery_beat",
    "security",
    "compliance",
    "recovery",
    "backups",
]

MIDDLEWARE = [
    # Before anything asks request.is_secure(): drops a proxy's scheme header sent by a peer
    # outside TRUSTED_PROXIES; refuses plain http under /api/ in production.
    "bridge.tls.HttpsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Before WhiteNoise, so that static files (an SVG opened directly, say) carry it too.
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Outermost of ours so it records the final status, including axes' lockout responses.
    "compliance.middleware.AuditMiddleware",
    # Before sessions and authentication: a banned or flooding client costs one lookup.
    "security.middleware.RateLimitMiddleware",
    # Right behind it, so a banned or refused request costs it nothing; it looks at the response
    # (404, 413) too. Only a suspicious request costs a write (security/threats.py).
    "security.middleware.ThreatMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Marks a session verified by its authenticator; then holds sessions to the two-factor
    # rule (a required role without an authenticator may open the enrolment page only).
    "django_otp.middleware.OTPMiddleware",
    "security.otp.SecondFactorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
    # Innermost: an exception escaping an /api/ view becomes JSON before DEBUG's HTML page.
    "bridge.middleware.ApiErrorMiddleware",
]

ROOT_URLCONF = "bridge.urls"
WSGI_APPLICATION = "bridge.wsgi.application"
AUTH_USER_MODEL = "security.User"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            conn_max_age=env_int("DB_CONN_MAX_AGE", 300, minimum=0),
            conn_health_checks=True,
        )
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "bridge.sqlite3",
            "OPTIONS": {
                # WAL lets web, worker and beat read while one writes; IMMEDIATE takes the
                # write lock at BEGIN so concurrent writers queue instead of failing mid-way.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
            "TEST": {"NAME": str(VAR_DIR / "test_bridge.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A database that stops answering must not hold requests, workers or the readiness probe
# forever: connecting gives up after DB_CONNECT_TIMEOUT seconds and PostgreSQL cancels any
# statement running longer than DB_STATEMENT_TIMEOUT ("0": no limit, e.g. for a long migration).
# SQLite keeps its busy timeout above (how long a writer waits for the write lock).
DB_CONNECT_TIMEOUT = env_int("DB_CONNECT_TIMEOUT", 5, minimum=1)
DB_STATEMENT_TIMEOUT = (
    None
    if env_str("DB_STATEMENT_TIMEOUT", "30s").strip() == "0"
    else env_duration("DB_STATEMENT_TIMEOUT", "30s")
)
if "postgresql" in DATABASES["default"]["ENGINE"] or "postgis" in DATABASES["default"]["ENGINE"]:
    _db_options = DATABASES["default"].setdefault("OPTIONS", {})
    _db_options.setdefault("connect_timeout", DB_CONNECT_TIMEOUT)
    if DB_STATEMENT_TIMEOUT is not None:
        _ms = int(DB_STATEMENT_TIMEOUT.total_seconds() * 1000)
        _db_options["options"] = f"{_db_options.get('options', '')} -c statement_timeout={_ms}"
        _db_options["options"] = _db_options["options"].strip()
# The same for Redis: connecting and every command give up after REDIS_TIMEOUT seconds.
REDIS_TIMEOUT = env_int("REDIS_TIMEOUT", 5, minimum=1)

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"socket_connect_timeout": REDIS_TIMEOUT, "socket_timeout": REDIS_TIMEOUT},
        }
    }
else:
    # Files under var/: shared by every process of the one host the embedded setup runs on
    # (a per-process memory cache would give each gunicorn worker its own view).
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

# --- Auth ---------------------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    # Django's ModelBackend, each user's permission set kept in the shared cache.
    "bridge.permission_cache.CachedPermissionBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Tests only: a fast hasher so that each test login costs microseconds, not PBKDF2's 0.3 s.
# Refused in production, and never the first choice for a stored password elsewhere.
if env_bool("BRIDGE_FAST_PASSWORD_HASHER", False):
    if env_str("BRIDGE_ENV", "development") == "production":
        raise ImproperlyConfigured("BRIDGE_FAST_PASSWORD_HASHER is for tests, not production")
    PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    ]

JWT_EXPIRATION = env_duration("JWT_EXPIRATION", "15m")
JWT_REFRESH_EXPIRATION = env_duration("JWT_REFRESH_EXPIRATION", "1d")
# Reuse grace (Okta's and Auth0's reuse interval): for this long after a rotation, the refresh
# token just rotated, presented again, gets the same successor pair back instead of revoking
# its family, so a client that lost the answer keeps its session. "0" (default): strict.
JWT_REFRESH_REUSE_GRACE = (
    None
    if env_str("JWT_REFRESH_REUSE_GRACE", "0").strip().rstrip("smhd") == "0"
    else env_duration("JWT_REFRESH_REUSE_GRACE", "0")
)
# Within the window a thief holding the spent token gets the live pair too: a window long
# enough to matter would switch reuse detection off. Okta caps its reuse interval at 60 s.
if JWT_REFRESH_REUSE_GRACE is not None and JWT_REFRESH_REUSE_GRACE.total_seconds() > 60:
    raise ImproperlyConfigured(
        "JWT_REFRESH_REUSE_GRACE: at most 60s (a longer window turns reuse detection off)"
    )
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": JWT_EXPIRATION,
    "REFRESH_TOKEN_LIFETIME": JWT_REFRESH_EXPIRATION,
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": False,
    "ALGORITHM": "HS256",
    "SIGNING_KEY": env_str("JWT_SIGNING_KEY") or SECRET_KEY,
    "AUTH_HEADER_TYPES": ("Bearer",),
    "USER_ID_FIELD": "id",
    "USER_ID_CLAIM": "user_id",
}

AXES_ENABLED = env_bool("AXES_ENABLED", True)
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = env_duration("AXES_COOLOFF_TIME", "15m")
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "security.ip.client_ip"
AXES_LOCKOUT_CALLABLE = "security.lockout.lockout_response"
AXES_VERBOSE = False
# axes keeps the form values of a failed console login: never the authenticator code.
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address", "otp_token"]

# Two-factor login (security/otp.py). Who must log in with a TOTP authenticator: "superuser"
# and/or role names (comma separated; empty: nobody must). A user who enrolled one is asked
# for its code at every login whatever this says.
OTP_REQUIRED_ROLES = env_list("OTP_REQUIRED_ROLES", "superuser,security_officer")

# --- API ----------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "security.authentication.VersionedJWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "bridge.pagination.Pagination",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["bridge.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "EXCEPTION_HANDLER": "bridge.exceptions.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Bridge API",
    "DESCRIPTION": "Hardening control plane: recovery, backups, security and compliance.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Swagger UI's files come from the installed sidecar package, not from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Fields named kind and status hold different choice sets in different areas.
    "ENUM_NAME_OVERRIDES": {
        "BackupKindEnum": "backups.choices.BackupKind",
        "BackupStatusEnum": "backups.choices.BackupStatus",
        "RestoreKindEnum": "backups.choices.RestoreKind",
        "RestoreStatusEnum": "backups.choices.RestoreStatus",
        # recovery's kind field documents its values only (no labels): named by them.
        "ServiceKindEnum": ["postgres", "redis", "rabbitmq", "celery", "http", "tcp"],
        "JobStatusEnum": "bridge.choices.JobStatus",
        "DsrTypeEnum": "compliance.choices.DsrType",
        "DsrStatusEnum": "compliance.choices.DsrStatus",
        "ReportTypeEnum": "compliance.choices.ReportType",
        "ReportFormatEnum": "compliance.choices.ReportFormat",
        "ApprovalStatusEnum": "compliance.choices.ApprovalStatus",
        "ApprovalActionEnum": "compliance.choices.ApprovalAction",
        "ViolationStatusEnum": "compliance.choices.ViolationStatus",
        "ViolationRuleEnum": "compliance.choices.ViolationRule",
        "ViolationSeverityEnum": "compliance.choices.ViolationSeverity",
        "RetentionCategoryEnum": "compliance.choices.RetentionCategory",
        "SoxOperationEnum": "compliance.choices.SoxOperation",
        "ConsentMethodEnum": "compliance.choices.ConsentMethod",
    },
    # Every refusal an operation can give is documented (401, 403, 400, 404, 500, 503...),
    # not only those a view names: the schema fuzz test holds every response to it.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "bridge.schema.add_error_responses",
    ],
}

# --- Encryption at rest (security/crypto.py) ----------------------------------------------
# The master key: base64 of 32 random bytes, from the environment or a file, never derived from
# SECRET_KEY. Production refuses to encrypt without it; development generates var/keys/master.key.
BRIDGE_MASTER_KEY = env_str("BRIDGE_MASTER_KEY")
# During a master key rotation: the keys being replaced (comma-separated), still accepted for
# unwrapping until `manage.py rotate_keys` has re-wrapped every data key under the current one.
BRIDGE_MASTER_KEY_PREVIOUS = [
    item.strip() for item in env_str("BRIDGE_MASTER_KEY_PREVIOUS").split(",") if item.strip()
]
# How long a process keeps a purpose's unwrapped data key (subject keys are never kept for
# decryption, so a shredded subject key stops opening anything everywhere at once; the audit
# trail's sealing cache keeps one up to 60 s for encryption only, see compliance/personal.py).
DATA_KEY_CACHE_SECONDS = env_int("DATA_KEY_CACHE_SECONDS", 300, minimum=0)
# Subject keys are left out of database dumps and backed up on their own, daily, with a short
# retention: a key shredded for an erasure is gone from every copy within the one-month deadline
# (GDPR Art. 12(3)), while a restore still finds every living subject's key.
SUBJECT_KEY_BACKUP_DIR = Path(env_str("SUBJECT_KEY_BACKUP_DIR") or VAR_DIR / "subject-key-backups")
SUBJECT_KEY_BACKUP_RETENTION_DAYS = env_int("SUBJECT_KEY_BACKUP_RETENTION_DAYS", 7, minimum=1)
if SUBJECT_KEY_BACKUP_RETENTION_DAYS >= 28:
    raise ImproperlyConfigured(
        "SUBJECT_KEY_BACKUP_RETENTION_DAYS must stay under 28: a shredded subject key has to be "
        "gone from its backups within the one-month erasure deadline"
    )

# --- Error recovery (recovery/) --------------------------------------------------------------
# Retries (recovery/retry.py, the one executor everything that calls out goes through):
# exponential backoff from BASE_RETRY_DELAY with jitter, capped at RETRY_MAX_DELAY, MAX_RETRIES
# retries within one RETRY_DEADLINE; retries may be at most RETRY_BUDGET_RATIO of the calls of
# the last RETRY_BUDGET_WINDOW (with RETRY_BUDGET_MIN allowed regardless), per service.
MAX_RETRIES = env_int("MAX_RETRIES", 5, minimum=0)
BASE_RETRY_DELAY = env_int("BASE_RETRY_DELAY", 1000, minimum=1)  # milliseconds
RETRY_MAX_DELAY = env_int("RETRY_MAX_DELAY", 30000, minimum=1)  # milliseconds
RETRY_DEADLINE = env_int("RETRY_DEADLINE", 60000, minimum=1)  # milliseconds, all attempts
RETRY_JITTER = env_str("RETRY_JITTER", "full")  # "full" or "decorrelated"
if RETRY_JITTER not in ("full", "decorrelated"):
    raise ImproperlyConfigured("RETRY_JITTER: full or decorrelated")
RETRY_BUDGET_RATIO = float(env_str("RETRY_BUDGET_RATIO", "0.2"))
RETRY_BUDGET_MIN = env_int("RETRY_BUDGET_MIN", 10, minimum=0)
RETRY_BUDGET_WINDOW = env_duration("RETRY_BUDGET_WINDOW", "1m")
# Circuit breakers (recovery/breaker.py): over BREAKER_WINDOW, with at least BREAKER_MIN_CALLS,
# a failure rate or a slow-call rate (calls over BREAKER_SLOW_CALL_MS) at or past its threshold
# opens the breaker for BREAKER_OPEN_BASE, doubled per consecutive trip up to BREAKER_OPEN_MAX;
# then BREAKER_HALF_OPEN_PERMITS trial calls decide.
BREAKER_WINDOW = env_duration("BREAKER_WINDOW", "30s")
BREAKER_MIN_CALLS = env_int("BREAKER_MIN_CALLS", 5, minimum=1)
BREAKER_FAILURE_RATE = float(env_str("BREAKER_FAILURE_RATE", "0.5"))
BREAKER_SLOW_RATE = float(env_str("BREAKER_SLOW_RATE", "0.8"))
BREAKER_SLOW_CALL_MS = env_int("BREAKER_SLOW_CALL_MS", 5000, minimum=1)
BREAKER_OPEN_BASE = env_duration("BREAKER_OPEN_BASE", "5s")
BREAKER_OPEN_MAX = env_duration("BREAKER_OPEN_MAX", "5m")
BREAKER_HALF_OPEN_PERMITS = env_int("BREAKER_HALF_OPEN_PERMITS", 1, minimum=1)
# Health (recovery/monitor.py): beat checks every HEALTH_CHECK_INTERVAL seconds, each probe
# within CASCADE_TIMEOUT ms; HEALTH_FAILURES_TO_DOWN failures in a row to go down,
# HEALTH_PASSES_TO_UP passes to come back; results older than HEALTH_STALE_AFTER are unknown.
HEALTH_CHECK_INTERVAL = env_int("HEALTH_CHECK_INTERVAL", 5, minimum=1)
CASCADE_TIMEOUT = env_int("CASCADE_TIMEOUT", 5000, minimum=100)
HEALTH_FAILURES_TO_DOWN = env_int("HEALTH_FAILURES_TO_DOWN", 2, minimum=1)
HEALTH_PASSES_TO_UP = env_int("HEALTH_PASSES_TO_UP", 2, minimum=1)
HEALTH_STALE_AFTER = env_duration("HEALTH_STALE_AFTER", "1m")
HEALTH_HISTORY_DAYS = env_int("HEALTH_HISTORY_DAYS", 7, minimum=1)
# Self-healing (recovery/healing.py).
ENABLE_SELF_HEALING = env_bool("ENABLE_SELF_HEALING", True)
HEAL_MAX_ATTEMPTS = env_int("HEAL_MAX_ATTEMPTS", 3, minimum=1)  # per service per window
HEAL_WINDOW = env_duration("HEAL_WINDOW", "1h")
HEAL_MAX_CONCURRENT = env_int("HEAL_MAX_CONCURRENT", 2, minimum=1)
# {"name": ["argv", "..."]}: the only commands a restart_command strategy may run.
RECOVERY_RESTART_COMMANDS = env_json("RECOVERY_RESTART_COMMANDS", {})
# Alerts on change: mail to these addresses (Django's mail backend), and a webhook (JSON POST,
# sent through the retry executor).
RECOVERY_ALERT_EMAILS = env_list("RECOVERY_ALERT_EMAILS")
RECOVERY_ALERT_WEBHOOK = env_str("RECOVERY_ALERT_WEBHOOK")

# --- Rate limits and bans (security/ratelimit.py) --------------------------------------------
ENABLE_DDOS_PROTECTION = env_bool("ENABLE_DDOS_PROTECTION", True)
# Requests per sliding window, per client IP (IPv6 per /64) and per endpoint class.
RATE_LIMITS = {
    kind: env_str(f"RATE_LIMIT_{kind.upper()}", default)
    for kind, default in {
        "auth": "20/1m",
        "read": "600/1m",
        "write": "120/1m",
        "export": "10/1m",
        "crypto": "60/1m",
    }.items()
}
# Login attempts per submitted username, from all addresses together.
RATE_LIMIT_LOGIN_USERNAME = env_str("RATE_LIMIT_LOGIN_USERNAME", "10/5m")
# Never limited (CIDRs): monitoring, the load balancer's own checks, office networks.
try:
    RATE_LIMIT_ALLOWLIST = [
        ipaddress.ip_network(item, strict=False) for item in env_list("RATE_LIMIT_ALLOWLIST")
    ]
except ValueError as exc:
    raise ImproperlyConfigured(f"RATE_LIMIT_ALLOWLIST: {exc}") from exc
# The IP_BAN_AFTER-th over-limit episode within IP_BAN_WINDOW bans the address for IP_BAN_BASE,
# doubled for each earlier ban within IP_BAN_MEMORY, at most IP_BAN_MAX.
IP_BAN_AFTER = env_int("IP_BAN_AFTER", 3, minimum=1)
IP_BAN_WINDOW = env_duration("IP_BAN_WINDOW", "1h")
IP_BAN_BASE = env_duration("IP_BAN_BASE", "5m")
IP_BAN_MAX = env_duration("IP_BAN_MAX", "1d")
IP_BAN_MEMORY = env_duration("IP_BAN_MEMORY", "7d")

# --- Threat assessment (security/threats.py) -------------------------------------------------
# Part of the protection ENABLE_DDOS_PROTECTION switches on (its bans are the limiter's); this
# turns the scoring alone off. Scored events of four layers add to a score per address (IPv6
# per /64) or per signed-in user that halves every THREAT_SCORE_HALF_LIFE.
ENABLE_THREAT_DETECTION = env_bool("ENABLE_THREAT_DETECTION", True)
THREAT_SCORE_HALF_LIFE = env_duration("THREAT_SCORE_HALF_LIFE", "1h")
# Crossing THREAT_ALERT_SCORE records one security.threat_alert event (an episode lasts until
# the score decays below it again); reaching THREAT_BAN_SCORE bans the address (IP_BAN_* lengths).
THREAT_ALERT_SCORE = env_int("THREAT_ALERT_SCORE", 50, minimum=1)
THREAT_BAN_SCORE = env_int("THREAT_BAN_SCORE", 100, minimum=1)
# Past these counts per sliding window, a client's 404s (per address, or per user when signed in)
# and a user's decryptions and exports are scored: a scanner, an unusual volume of data read.
THREAT_404_BURST = env_str("THREAT_404_BURST", "20/1m")
THREAT_DECRYPT_VOLUME = env_str("THREAT_DECRYPT_VOLUME", "200/1h")
THREAT_EXPORT_VOLUME = env_str("THREAT_EXPORT_VOLUME", "10/1h")
# Points per kind of event, overriding the defaults in security/threats.py: {"xss": 30, ...}.
THREAT_SCORES = env_json("THREAT_SCORES", {})

# --- Compliance: GDPR, SOX, retention, reports (compliance/, README "Compliance") ---------
ENABLE_GDPR_COMPLIANCE = env_bool("ENABLE_GDPR_COMPLIANCE", True)
ENABLE_SOX_COMPLIANCE = env_bool("ENABLE_SOX_COMPLIANCE", True)
# Tables whose every row change is recorded before/after by a database trigger (app.Model
# labels; many-to-many tables as app.Model_field). Bridge's configuration and permissions.
SOX_AUDITED_MODELS = env_list(
    "SOX_AUDITED_MODELS",
    "security.User,security.User_groups,security.User_user_permissions,auth.Group,"
    "auth.Group_permissions,recovery.Service,security.StoredSecret,"
    "django_celery_beat.PeriodicTask",
)
# Columns never copied into a change record: only whether they changed is kept.
SOX_SECRET_COLUMNS = env_list(
    "SOX_SECRET_COLUMNS", "password,wrapped,value,ciphertext,secret,token,key"
)
# Segregation of duties: a live restore and a key rotation need a second authorised person.
SOX_REQUIRE_SECOND_APPROVAL = env_bool("SOX_REQUIRE_SECOND_APPROVAL", ENABLE_SOX_COMPLIANCE)
SOX_APPROVAL_TTL = env_duration("SOX_APPROVAL_TTL", "24h")
# Retention (days) per category; DATA_RETENTION_DAYS (7 years) unless a category says less.
DATA_RETENTION_DAYS = env_int("DATA_RETENTION_DAYS", 2555, minimum=1)
RETENTION_DAYS = {
    "audit_events": env_int("RETENTION_AUDIT_EVENTS_DAYS", DATA_RETENTION_DAYS, minimum=1),
    "api_requests": env_int("RETENTION_API_REQUESTS_DAYS", DATA_RETENTION_DAYS, minimum=1),
    "dsr_records": env_int("RETENTION_DSR_RECORDS_DAYS", DATA_RETENTION_DAYS, minimum=1),
    "reports": env_int("RETENTION_REPORTS_DAYS", DATA_RETENTION_DAYS, minimum=1),
}
# The daily retention job reports what it would purge and purges nothing.
RETENTION_DRY_RUN = env_bool("RETENTION_DRY_RUN", False)
# Data subject requests: reminders this many days before the due date; exports kept this long.
DSR_REMINDER_DAYS = env_int("DSR_REMINDER_DAYS", 7, minimum=1)
DSR_EXPORT_DIR = Path(env_str("DSR_EXPORT_DIR", str(VAR_DIR / "dsr-exports")))
DSR_EXPORT_TTL_DAYS = env_int("DSR_EXPORT_TTL_DAYS", 30, minimum=1)
# Purposes consent can be given for (PUT /api/compliance/gdpr/consent/{subject_id}).
# The controller named in consent receipts and data subject exports.
GDPR_CONTROLLER = env_str("GDPR_CONTROLLER", "Bridge")
GDPR_CONSENT_PURPOSES = env_list(
    "GDPR_CONSENT_PURPOSES", "marketing,analytics,personalisation,third_party_sharing"
)
# Hash version 2: actor usernames, client IPs and these detail keys of audit events are
# sealed under the data subject's key (erasable without breaking the chain).
AUDIT_PERSONAL_DATA = env_bool("AUDIT_PERSONAL_DATA", True)
AUDIT_PERSONAL_DETAIL_KEYS = env_list(
    "AUDIT_PERSONAL_DETAIL_KEYS", "email,subject_id,full_name,first_name,last_name,phone,address"
)
REPORT_DIR = Path(env_str("REPORT_DIR", str(VAR_DIR / "reports")))
# A report never silently stops: past this many rows it is marked truncated, and says so.
REPORT_MAX_ROWS = env_int("REPORT_MAX_ROWS", 5_000_000, minimum=1)
# Compliance monitoring: rules run this often (and on events); violations alert these.
COMPLIANCE_CHECK_INTERVAL = env_int("COMPLIANCE_CHECK_INTERVAL", 300, minimum=30)
COMPLIANCE_ALERT_EMAILS = env_list("COMPLIANCE_ALERT_EMAILS")
COMPLIANCE_ALERT_WEBHOOK = env_str("COMPLIANCE_ALERT_WEBHOOK")
# Exports (DSR exports, report downloads, audit exports) per user in a window above which
# the export-volume rule raises a violation.
COMPLIANCE_EXPORT_VOLUME = env_str("COMPLIANCE_EXPORT_VOLUME", "20/1h")

# --- Audit --------------------------------------------------------------------------------
ENABLE_AUDIT_LOGGING = env_bool("ENABLE_AUDIT_LOGGING", True)
# Every second: a sealed event is tamper-evident sooner, and the unfiltered event count (sealed
# total + a primary-key range count of the unsealed ones) stays cheap on every list request.
AUDIT_SEAL_INTERVAL = env_int("AUDIT_SEAL_INTERVAL", 1, minimum=1)
AUDIT_SEAL_BATCH = env_int("AUDIT_SEAL_BATCH", 5000, minimum=1)
# Request events of concurrent requests share one INSERT and one commit (compliance/writer.py).
AUDIT_GROUP_COMMIT = env_bool("AUDIT_GROUP_COMMIT", True)
# Signed checkpoints (compliance/checkpoints.py). The Ed25519 key that signs them is a file
# outside the database; production refuses to start without one (a key Bridge generated for
# itself next to its data would prove little), development generates one under var/keys/.
_audit_key_file = os.environ.get("AUDIT_SIGNING_KEY_FILE", "").strip()
if PRODUCTION and ENABLE_AUDIT_LOGGING and not _audit_key_file:
    raise ImproperlyConfigured(
        "AUDIT_SIGNING_KEY_FILE is not set: in production the audit checkpoints must be signed "
        "with a key kept outside the database (python manage.py rotate_audit_key --new-key-file "
        "PATH writes one)"
    )
AUDIT_SIGNING_KEY_FILE = (
    Path(_audit_key_file) if _audit_key_file else VAR_DIR / "keys" / "audit_signing_key.pem"
)
AUDIT_CHECKPOINT_INTERVAL = env_int("AUDIT_CHECKPOINT_INTERVAL", 60, minimum=5)
# How many hashes inside its range a checkpoint signs besides its last: a rewrite is then
# named to the exact seq, or to within range/AUDIT_CHECKPOINT_WAYPOINTS events of it.
AUDIT_CHECKPOINT_WAYPOINTS = env_int("AUDIT_CHECKPOINT_WAYPOINTS", 32, minimum=1)
# The default sink: an append-only directory of JSON lines, one file per day. Put it on
# another disk or host (an NFS mount, a WORM volume) than the database.
AUDIT_CHECKPOINT_DIR = Path(env_str("AUDIT_CHECKPOINT_DIR", str(VAR_DIR / "audit-checkpoints")))
# More sinks: django-storages targets, as a JSON object of STORAGES entries by name, e.g.
# {"offsite": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {...}}} (or _FILE).
AUDIT_CHECKPOINT_STORAGES = env_json("AUDIT_CHECKPOINT_STORAGES", {})

# --- Backups and disaster recovery (backups/) -------------------------------------------------
# Pipeline: source -> zstd -> AES-256-GCM in framed chunks, a random data key per backup
# wrapped under the security app's master key (backups/stream.py).
ENABLE_BACKUP_COMPRESSION = env_bool("ENABLE_BACKUP_COMPRESSION", True)
BACKUP_COMPRESSION_LEVEL = env_int("BACKUP_COMPRESSION_LEVEL", 3, minimum=1)
if BACKUP_COMPRESSION_LEVEL > 22:
    raise ImproperlyConfigured("BACKUP_COMPRESSION_LEVEL: zstd levels go from 1 to 22")
ENABLE_BACKUP_ENCRYPTION = env_bool("ENABLE_BACKUP_ENCRYPTION", True)
if not ENABLE_BACKUP_ENCRYPTION and not DEBUG:
    raise ImproperlyConfigured(
        "ENABLE_BACKUP_ENCRYPTION=false is allowed only with DEBUG on: backups hold every "
        "secret and personal record Bridge keeps"
    )
BACKUP_CHUNK_SIZE = env_int("BACKUP_CHUNK_SIZE", 1024 * 1024, minimum=4096)
# Retention: nothing younger than BACKUP_RETENTION_DAYS is deleted, and beyond it the newest
# backup of each of the last KEEP_DAILY days, KEEP_WEEKLY weeks and KEEP_MONTHLY months stays.
BACKUP_RETENTION_DAYS = env_int("BACKUP_RETENTION_DAYS", 30, minimum=1)
BACKUP_KEEP_DAILY = env_int("BACKUP_KEEP_DAILY", 7, minimum=0)
BACKUP_KEEP_WEEKLY = env_int("BACKUP_KEEP_WEEKLY", 4, minimum=0)
BACKUP_KEEP_MONTHLY = env_int("BACKUP_KEEP_MONTHLY", 12, minimum=0)
# Backups pending or running at once; another start is refused (409 backups_busy) meanwhile.
BACKUP_MAX_CONCURRENT = env_int("BACKUP_MAX_CONCURRENT", 2, minimum=1)
# The recovery point objective: the newest successful backup older than this is a problem.
BACKUP_RPO = env_duration("BACKUP_RPO", "24h")
# Targets: name -> {"backend": a django-storages (or Django) storage class, "options": its
# keyword arguments, "media": what it is stored on, "offsite": bool, "secret": the name of a
# StoredSecret holding its password (never in the environment)}. The default is two local
# directories on different paths; BACKUP_EXTRA_TARGETS adds (e.g. an offsite SFTP server),
# BACKUP_TARGETS replaces.
BACKUP_DIR = Path(env_str("BACKUP_DIR") or VAR_DIR / "backups")
BACKUP_MIRROR_DIR = Path(env_str("BACKUP_MIRROR_DIR") or VAR_DIR / "backups-mirror")
_FS_STORAGE = "django.core.files.storage.FileSystemStorage"
BACKUP_TARGETS = env_json(
    "BACKUP_TARGETS",
    {
        "local": {
            "backend": _FS_STORAGE,
            "options": {"location": str(BACKUP_DIR)},
            "media": "disk",
            "offsite": False,
        },
        "local-mirror": {
            "backend": _FS_STORAGE,
            "options": {"location": str(BACKUP_MIRROR_DIR)},
            "media": "disk",
            "offsite": False,
        },
    },
)
BACKUP_TARGETS.update(env_json("BACKUP_EXTRA_TARGETS", {}))
# PostgreSQL databases of the service stack backed up beside Bridge's own (URLs).
BACKUP_DATABASES = env_list("BACKUP_DATABASES")
BACKUP_CONFIG_PATHS = env_list("BACKUP_CONFIG_PATHS")
# The Redis database the `redis` component snapshots (default: REDIS_URL's).
BACKUP_REDIS_URL = env_str("BACKUP_REDIS_URL") or REDIS_URL
MEDIA_ROOT = Path(env_str("MEDIA_ROOT") or VAR_DIR / "media")
MEDIA_URL = "media/"
# Point in time: the PostgreSQL server whose WAL `manage.py archive_wal` archives (a URL whose
# user may connect for replication); empty: point-in-time restores to a time are unavailable.
BACKUP_PITR_DATABASE = env_str("BACKUP_PITR_DATABASE")
# A point-in-time replay runs a private postmaster as this OS user (when Bridge runs as root:
# PostgreSQL refuses root), whose restore_command runs `manage.py fetch_wal` with this Python.
BACKUP_PITR_OS_USER = env_str("BACKUP_PITR_OS_USER", "postgres")
BACKUP_PITR_PYTHON = env_str("BACKUP_PITR_PYTHON")
# A live database restore waits this long for a table lock held by live traffic, then is
# refused with nothing changed (rather than hang, or stall the traffic behind its lock).
BACKUP_RESTORE_LOCK_TIMEOUT = env_duration("BACKUP_RESTORE_LOCK_TIMEOUT", "5s")
# Restore drills and PITR replays work here (scratch databases are made on the server itself).
BACKUP_SCRATCH_DIR = Path(env_str("BACKUP_SCRATCH_DIR") or VAR_DIR / "restore-scratch")

# --- Jobs -------------------------------------------------------------------------------
# A running job reports progress (its heartbeat) at least this often, or the reaper fails it as
# lost with its worker; a pending job no worker took within the second limit fails likewise.
JOB_HEARTBEAT_TIMEOUT = env_int("JOB_HEARTBEAT_TIMEOUT", 300, minimum=10)
JOB_PENDING_TIMEOUT = env_int("JOB_PENDING_TIMEOUT", 3600, minimum=60)
AUDIT_VERIFY_INTERVAL = env_int("AUDIT_VERIFY_INTERVAL", 3600, minimum=60)

# --- Celery -------------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = VAR_DIR / "celery" / "queue"
    _queue_dir.mkdir(parents=True, exist_ok=True)
    (VAR_DIR / "celery" / "processed").mkdir(parents=True, exist_ok=True)
    (VAR_DIR / "celery" / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(VAR_DIR / "celery" / "processed"),
        # kombu's default is ./control, in whatever directory the worker was started from
        "control_folder": str(VAR_DIR / "celery" / "control"),
        "store_processed": False,
    }
# A broker that accepts connections and never answers must not hold a web request that queues
# a job: connecting, reading and publishing give up after BROKER_TIMEOUT seconds, and a publish
# is retried twice, quickly, before the job is failed as "could not be queued".
BROKER_TIMEOUT = env_int("BROKER_TIMEOUT", 5, minimum=1)
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "socket_timeout": BROKER_TIMEOUT,
        "socket_connect_timeout": BROKER_TIMEOUT,
    }
CELERY_BROKER_CONNECTION_TIMEOUT = BROKER_TIMEOUT
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
# Worker and beat import it at start: its signal handlers write their heartbeats, which
# /health/ready reads (recovery/health.py).
CELERY_IMPORTS = ["recovery.health"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
# django-celery-beat copies this into its tables at start; the admin can then pause or retime it.
CELERY_BEAT_SCHEDULE = {
    "seal-audit-chain": {
        "task": "compliance.tasks.seal_audit_chain_task",
        "schedule": float(AUDIT_SEAL_INTERVAL),
        # A tick the worker could not take in time is dropped: the next one seals it all.
        # (django-celery-beat's name for Celery's `expires`.)
        "options": {"expire_seconds": max(10, 5 * AUDIT_SEAL_INTERVAL)},
    },
    # Looks for events committed long after newer ones were sealed, over the whole table.
    "sweep-audit-chain": {
        "task": "compliance.tasks.seal_audit_chain_task",
        "schedule": 3600.0,
        "kwargs": {"sweep": True},
    },
    "checkpoint-audit-chain": {
        "task": "compliance.tasks.checkpoint_audit_chain_task",
        "schedule": float(AUDIT_CHECKPOINT_INTERVAL),
        "options": {"expire_seconds": AUDIT_CHECKPOINT_INTERVAL},
    },
    "verify-audit-chain": {
        "task": "compliance.tasks.scheduled_verification_task",
        "schedule": float(AUDIT_VERIFY_INTERVAL),
    },
    "compliance-rules": {
        "task": "compliance.tasks.evaluate_rules_task",
        "schedule": float(COMPLIANCE_CHECK_INTERVAL),
        "options": {"expire_seconds": COMPLIANCE_CHECK_INTERVAL},
    },
    "compliance-retention-daily": {
        "task": "compliance.tasks.retention_task",
        "schedule": 86400.0,
    },
    "backup-subject-keys": {
        "task": "security.tasks.backup_subject_keys_task",
        "schedule": 86400.0,
    },
    # Runs the checks that are due (each service has its own interval), concurrently.
    "recovery-health-checks": {
        "task": "recovery.tasks.run_health_checks_task",
        "schedule": float(HEALTH_CHECK_INTERVAL),
        "options": {"expire_seconds": HEALTH_CHECK_INTERVAL},
    },
    # Backups (backups/tasks.py): a daily full, hourly incrementals on it, the retention
    # policy daily and a restore drill weekly; all four are editable in the console.
    "backup-full-daily": {
        "task": "backups.tasks.scheduled_backup_task",
        "schedule": 86400.0,
        "kwargs": {"kind": "full"},
    },
    "backup-incremental-hourly": {
        "task": "backups.tasks.scheduled_backup_task",
        "schedule": 3600.0,
        "kwargs": {"kind": "incremental"},
    },
    "backup-cleanup-daily": {"task": "backups.tasks.cleanup_task", "schedule": 86400.0},
    "backup-drill-weekly": {"task": "backups.tasks.scheduled_drill_task", "schedule": 604800.0},
    "backup-reap": {
        "task": "backups.tasks.reap_task",
        "schedule": 60.0,
        "options": {"expire_seconds": 60},
    },
    "reap-stale-jobs": {
        "task": "bridge.tasks.reap_stale_jobs_task",
        "schedule": 60.0,
        "options": {"expire_seconds": 60},
    },
}

# --- I18N, static -------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    **{f"audit_checkpoints_{name}": spec for name, spec in AUDIT_CHECKPOINT_STORAGES.items()},
}
WHITENOISE_USE_FINDERS = DEBUG

# --- Hardening ----------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
# Error pages (DEBUG's technical page included) and error mails hide the connection URLs,
# which carry passwords, as they hide SECRET_KEY.
DEFAULT_EXCEPTION_REPORTER_FILTER = "bridge.runtime.SecretUrlFilter"
if not DEBUG:
    # Cookies only over HTTPS; `make run` serves plain http on 127.0.0.1, so not there.
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not LOCAL_RUN)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not LOCAL_RUN)
    SECURE_CONTENT_TYPE_NOSNIFF = True
    # Production is served over HTTPS only (BRIDGE_ENV=production), so browsers are told so
    # for a year, subdomains of Bridge's host included, with the preload directive (joining
    # the browsers' list stays a manual step at hstspreload.org). Elsewhere opt-in: a browser
    # that learnt HSTS cannot reach plain http on that host for max-age.
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if PRODUCTION else 0, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", PRODUCTION)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", PRODUCTION)
    # The console's plain-http pages redirect to https. Not /api/: bridge.tls.HttpsMiddleware
    # refuses it (API_HTTPS_ONLY). Not /health/: load balancers and the kubelet probe over
    # plain http from the inside, and a redirect would read as "down".
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", PRODUCTION)
    SECURE_REDIRECT_EXEMPT = [r"^health/", r"^api/"]
# Plain http under /api/ gets 403 https_required in production rather than a redirect.
API_HTTPS_ONLY = PRODUCTION
# bridge/gunicorn.conf.py reads the same variable: TLS 1.3 only when on, TLS 1.2 too when off.
ENABLE_TLS13 = env_bool("ENABLE_TLS13", True)
# Behind a TLS-terminating proxy that sets this header (e.g. X-Forwarded-Proto) on every
# request: "https" in it means the client spoke HTTPS. Believed only from TRUSTED_PROXIES
# (bridge.tls.HttpsMiddleware drops it from any other peer), so it needs them declared.
_proxy_ssl_header = env_str("SECURE_PROXY_SSL_HEADER").strip()
if _proxy_ssl_header:
    if not TRUSTED_PROXIES:
        raise ImproperlyConfigured(
            "SECURE_PROXY_SSL_HEADER is set but TRUSTED_PROXIES is empty: name the proxies "
            "(CIDRs) whose header is believed"
        )
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https")

# Content-Security-Policy on every response (django-csp). Scripts only from Bridge itself:
# Swagger UI loads its start-up script from its own URL rather than inline. 'unsafe-eval' is
# for Alpine.js, which the console (unfold) uses and which evaluates its x-data/x-on attributes
# with new Function(). Styles allow 'unsafe-inline': unfold, Swagger UI and the dashboard set
# style attributes and <style> blocks, which no nonce or hash can cover.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'", "'unsafe-eval'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],  # Swagger UI's icons are data: SVGs in its CSS
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

# --- Health probes (recovery/health.py) ----------------------------------------------------
# /health/ready reports the worker or beat as missing ("degraded") once its last heartbeat is
# older than this (they beat every few seconds) ...
HEALTH_HEARTBEAT_MAX_AGE = env_duration("HEALTH_HEARTBEAT_MAX_AGE", "30s")
# ... and the audit trail once its oldest unsealed event is older than this (or than three
# AUDIT_SEAL_INTERVALs, if longer): the sealer is behind or stopped. Recorded once per episode
# as audit.seal_lag.
AUDIT_SEAL_MAX_LAG = env_duration("AUDIT_SEAL_MAX_LAG", "30s")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {"quiet_static": {"()": "bridge.runtime.QuietStaticAccessFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "axes": {"level": "WARNING"},
        # gunicorn's access log (`make run`), minus the static files a page load pulls in.
        "gunicorn.access": {
            "handlers": ["console"],
            "filters": ["quiet_static"],
            "level": "INFO",
            "propagate": False,
        },
        # Celery logs every task sent, received and succeeded at INFO: with the sealer ticking
        # each second that buries everything else. Failures are still logged (ERROR).
        "celery.app.trace": {"level": "WARNING"},
        "celery.worker.strategy": {"level": "WARNING"},
        "celery.beat": {"level": "WARNING"},
        # "No hostname was supplied" for the embedded filesystem broker, which has none.
        "kombu.connection": {"level": "ERROR"},
    },
}

BRIDGE_ADMIN_USERNAME = env_str("BRIDGE_ADMIN_USERNAME", "admin")

# --- Console (django-unfold) ---------------------------------------------------------------
# The sidebar is built per request (bridge.admin_site.sidebar_navigation): one group per area,
# each link shown only to a user whose permissions allow it. Colours are unfold's defaults.
UNFOLD = {
    "SITE_TITLE": "Bridge",
    "SITE_HEADER": "Bridge console",
    "SITE_SUBHEADER": "Hardening control plane",
    "SITE_SYMBOL": "shield_lock",
    "SHOW_VIEW_ON_SITE": False,
    "SIDEBAR": {
        "show_search": True,
        "show_all_applications": True,
        "navigation": "bridge.admin_site.sidebar_navigation",
    },
}
