"""`EncryptedTextField`: a model field stored as an AES-256-GCM ciphertext (security/crypto.py).

Every value is bound to where it belongs: the model, the field and (with `row_key`) the row, so
a ciphertext copied into another row or column by someone with database rights does not
decrypt. A value that does not decrypt raises `CryptoError` when it is read; it is never handed
back as if it were the plaintext (django-fernet-encrypted-fields returns the stored text).

The database value is decrypted lazily, when the attribute is first read: the row identity is
only known on the instance, and listing rows never decrypts what nobody looks at. Saving a row
whose encrypted value was never read writes the ciphertext back untouched.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.query_utils import DeferredAttribute

# security.crypto is imported where it is used: it imports the models, which use this field.


class Sealed(str):
    """A ciphertext as loaded from the database, not yet decrypted."""

    __slots__ = ()


class _DecryptingAttribute(DeferredAttribute):
    # A data descriptor (it has __set__), so reads come here even though the value lives in
    # the instance's __dict__.
    def __set__(self, instance: models.Model, value: Any) -> None:
        instance.__dict__[self.field.attname] = value

    def __get__(self, instance: models.Model | None, cls: type | None = None) -> Any:
        value = super().__get__(instance, cls)
        if instance is None or not isinstance(value, Sealed):
            return value
        from security import crypto

        field: EncryptedTextField = self.field  # type: ignore[assignment]
        plaintext = crypto.decrypt(str(value), context=field.context_for(instance)).decode()
        # Kept decrypted on this instance; the next save seals it again with a fresh nonce.
        instance.__dict__[field.attname] = plaintext
        return plaintext


class EncryptedTextField(models.TextField):
    """Text encrypted at rest under the data key of `purpose`.

    `row_key` names the field whose value identifies the row (unique and never changed, like a
    name or a UUID primary key); it is bound into each ciphertext. Without it only the model and
    the field are bound (an auto-increment primary key is unknown before the first insert).
    Lookups: `isnull`, and `exact` against a ciphertext (a compare-and-swap); a plaintext in a
    query is refused, since ciphertexts with random nonces never equal anything but themselves.
    """

    descriptor_class = _DecryptingAttribute

    def __init__(self, *args: Any, purpose: str = "field", row_key: str = "", **kwargs: Any):
        self.purpose = purpose
        self.row_key = row_key
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[str, str, list, dict]:
        name, path, args, kwargs = super().deconstruct()
        kwargs["purpose"] = self.purpose
        if self.row_key:
            kwargs["row_key"] = self.row_key
        return name, path, args, kwargs

    def context_for(self, instance: models.Model) -> str:
        where = f"{self.model._meta.label_lower}.{self.name}"
        if not self.row_key:
            return where
        from security import crypto

        row = getattr(instance, self.row_key)
        if row in (None, ""):
            raise crypto.CryptoError(f"{self.row_key} must be set before {self.name} is sealed")
        return f"{where}:{row}"

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Sealed | None:
        return None if value is None else Sealed(value)

    def pre_save(self, model_instance: models.Model, add: bool) -> str | None:
        value = model_instance.__dict__.get(self.attname)
        if value is None or isinstance(value, Sealed):
            return value
        if not isinstance(value, str):
            raise TypeError(f"{self.name}: an encrypted field holds text, not {type(value)}")
        from security import crypto

        return crypto.encrypt(
            value.encode(), purpose=self.purpose, context=self.context_for(model_instance)
        )

    def get_prep_value(self, value: Any) -> Any:
        # Reached with pre_save's ciphertext, or a ciphertext a lookup compares (a
        # compare-and-swap); a plaintext here would be a query on secrets, refused.
        if value is None:
            return None
        if not str(value).startswith("v1."):
            raise TypeError(f"{self.name} is encrypted: queries compare ciphertexts only")
        return str(value)

    def get_lookup(self, lookup_name: str) -> Any:
        if lookup_name not in ("isnull", "exact"):
            raise TypeError(
                f"{self.name} is encrypted: only isnull lookups are possible, not {lookup_name}"
            )
        return super().get_lookup(lookup_name)

    def value_from_object(self, obj: models.Model) -> str | None:
        # Serialisers (dumpdata, fixtures) and forms get the ciphertext, never the plaintext;
        # a value set but not saved yet is sealed for them.
        raw = obj.__dict__.get(self.attname)
        if raw is None or isinstance(raw, Sealed):
            return raw
        return self.pre_save(obj, add=False)

    def value_to_string(self, obj: models.Model) -> str:
        return self.value_from_object(obj) or ""

    def sealed_value(self, instance: models.Model) -> str | None:
        """The stored ciphertext of a row loaded from the database, without decrypting."""
        raw = instance.__dict__.get(self.attname)
        return str(raw) if isinstance(raw, Sealed) else None


def encrypted_fields() -> list[EncryptedTextField]:
    """Every encrypted field of every installed model (rotation re-encrypts them all)."""
    from django.apps import apps

    return [
        field
        for model in apps.get_models()
        for field in model._meta.concrete_fields
        if isinstance(field, EncryptedTextField)
    ]
