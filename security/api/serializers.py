from rest_framework import serializers

from bridge.api import StrictCharField


class LoginSerializer(serializers.Serializer):
    username = StrictCharField(max_length=150)
    password = StrictCharField(max_length=4096, write_only=True, trim_whitespace=False)
    otp = StrictCharField(
        max_length=16,
        required=False,
        default="",
        allow_blank=True,
        write_only=True,
        help_text=(
            "The current code of the user's authenticator (6 digits), required once they have "
            "enrolled one: without it 401 `otp_required`; wrong 401 `otp_invalid`, already "
            "used 401 `otp_reused` (each counted by the lockout like a wrong password)."
        ),
    )


class RefreshSerializer(serializers.Serializer):
    refresh = StrictCharField(max_length=4096)


class TokenPairSerializer(serializers.Serializer):
    access = serializers.CharField()
    refresh = serializers.CharField()


class LogoutResultSerializer(serializers.Serializer):
    detail = serializers.CharField()
    sessions_revoked = serializers.IntegerField()


class EncryptRequestSerializer(serializers.Serializer):
    plaintext = StrictCharField(
        max_length=100_000,
        allow_blank=True,
        trim_whitespace=False,
        help_text="UTF-8 text, up to 100,000 characters.",
    )
    context = StrictCharField(
        max_length=200,
        required=False,
        default="",
        allow_blank=True,
        help_text="Where the ciphertext belongs (model, row, field...); decryption needs it.",
    )
    subject_id = StrictCharField(
        max_length=128,
        required=False,
        default="",
        allow_blank=True,
        help_text="The data subject: their own key, which erasure destroys.",
    )


class EncryptResultSerializer(serializers.Serializer):
    ciphertext = serializers.CharField()
    key_id = serializers.CharField()
    algorithm = serializers.CharField()


class DecryptRequestSerializer(serializers.Serializer):
    ciphertext = StrictCharField(max_length=600_000, trim_whitespace=False)
    context = StrictCharField(max_length=200, required=False, default="", allow_blank=True)


class DecryptResultSerializer(serializers.Serializer):
    plaintext = serializers.CharField()
