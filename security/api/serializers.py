from rest_framework import serializers

from bridge.api import StrictCharField


class LoginSerializer(serializers.Serializer):
    username = StrictCharField(max_length=150)
    password = StrictCharField(max_length=4096, write_only=True, trim_whitespace=False)


class RefreshSerializer(serializers.Serializer):
    refresh = StrictCharField(max_length=4096)


class TokenPairSerializer(serializers.Serializer):
    access = serializers.CharField()
    refresh = serializers.CharField()


class LogoutResultSerializer(serializers.Serializer):
    detail = serializers.CharField()
    sessions_revoked = serializers.IntegerField()
