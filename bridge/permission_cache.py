"""Permission checks at no database cost per request: each user's set in the shared cache."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from django.contrib.auth.backends import ModelBackend

log = logging.getLogger(__name__)

_GENERATION_KEY = "bridge:perms:generation"
# A backstop only: every change made through Django bumps the generation at once.
PERMISSION_CACHE_SECONDS = 300


def _user_key(user: Any) -> str:
    from django.db import connection

    # The database name keeps two databases sharing one cache (a test run beside `make run`)
    # from reading each other's entries.
    return f"bridge:perms:{connection.settings_dict['NAME']}:{user.pk}"


def bump_permission_generation(**kwargs: Any) -> None:
    """Forget every cached permission set once the change that calls this commits.

    Not before: a request reading the database between the signal and the commit would cache
    the old set under the new generation.
    """
    from django.db import transaction

    transaction.on_commit(_bump)


def _bump() -> None:
    from django.core.cache import cache

    # A random token, never a counter: a counter that expired or was evicted (the file cache
    # culls, Redis evicts) would restart and climb back onto values old entries carry.
    try:
        cache.set(_GENERATION_KEY, uuid.uuid4().hex, None)
    except Exception:
        # Cached sets now live until they expire: say so loudly.
        log.exception(
            "could not invalidate cached permissions; they expire within %s s",
            PERMISSION_CACHE_SECONDS,
        )


# After a cache error this process asks the database for a while instead of waiting on a hung
# cache for every request (twice REDIS_TIMEOUT per permission check otherwise).
_CACHE_PAUSE_SECONDS = 30.0
_cache_paused_until = 0.0


def _cache_failed(operation: str) -> None:
    global _cache_paused_until
    _cache_paused_until = time.monotonic() + _CACHE_PAUSE_SECONDS
    log.warning(
        "permission cache %s failed; asking the database for %.0f s",
        operation,
        _CACHE_PAUSE_SECONDS,
        exc_info=True,
    )


def _generation(cache: Any, found: dict) -> str:
    generation = found.get(_GENERATION_KEY)
    if generation is None:
        # Missing (first use, evicted): a new token; whoever adds first wins, others read it.
        cache.add(_GENERATION_KEY, uuid.uuid4().hex, None)
        generation = cache.get(_GENERATION_KEY)
    return generation


class CachedPermissionBackend(ModelBackend):
    """Django's ModelBackend with each user's permission set kept in the shared cache.

    Every API call asks `has_perm`; the ModelBackend answers with two joins over the auth
    tables per request, which doubled the cost of the busiest endpoint. The set is cached per
    user under a generation token that any committed change of groups or permissions replaces
    (signals below), and an entry is used only for the same user row (`date_joined`) and
    superuser flag. A change made behind Django's back (raw SQL on the link tables) counts
    within PERMISSION_CACHE_SECONDS. Without a working cache the database is asked, as before.
    """

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if not user_obj.is_active or user_obj.is_anonymous or obj is not None:
            return set()
        if hasattr(user_obj, "_perm_cache"):
            return user_obj._perm_cache
        if time.monotonic() < _cache_paused_until:
            return super().get_all_permissions(user_obj)
        from django.core.cache import cache

        key = _user_key(user_obj)
        identity = (user_obj.is_superuser, user_obj.date_joined.isoformat())
        try:
            found = cache.get_many([_GENERATION_KEY, key])
            generation = _generation(cache, found)
        except Exception:
            _cache_failed("read")
            return super().get_all_permissions(user_obj)
        entry = found.get(key)
        if generation and entry and entry[0] == generation and entry[1] == identity:
            user_obj._perm_cache = set(entry[2])
            return user_obj._perm_cache
        perms = super().get_all_permissions(user_obj)
        if generation:
            try:
                cache.set(key, (generation, identity, sorted(perms)), PERMISSION_CACHE_SECONDS)
            except Exception:
                _cache_failed("write")
        return perms


def connect_invalidation() -> None:
    """Bump the generation on every change of who holds which permission."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group, Permission
    from django.db.models.signals import m2m_changed, post_delete, post_save

    user_model = get_user_model()
    for through in (
        user_model.groups.through,
        user_model.user_permissions.through,
        Group.permissions.through,
    ):
        m2m_changed.connect(bump_permission_generation, sender=through, weak=False)
    for model in (Group, Permission):
        post_save.connect(bump_permission_generation, sender=model, weak=False)
        post_delete.connect(bump_permission_generation, sender=model, weak=False)
