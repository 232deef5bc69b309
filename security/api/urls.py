from django.urls import path

from security.api import posture, threats, views

urlpatterns = [
    path("auth/login", views.LoginView.as_view(), name="auth-login"),
    path("auth/refresh", views.RefreshView.as_view(), name="auth-refresh"),
    path("auth/logout", views.LogoutView.as_view(), name="auth-logout"),
    path("encrypt", views.CryptoViewSet.as_view({"post": "encrypt"}), name="encrypt"),
    path("decrypt", views.CryptoViewSet.as_view({"post": "decrypt"}), name="decrypt"),
    path("keys/rotate", views.KeyRotationViewSet.as_view({"post": "rotate"}), name="keys-rotate"),
    path("status", posture.PostureViewSet.as_view({"get": "status"}), name="status"),
    path("test", posture.PostureViewSet.as_view({"post": "self_test"}), name="self-test"),
    path("reset", posture.PostureViewSet.as_view({"post": "reset"}), name="reset"),
    path("threats", threats.ThreatViewSet.as_view({"get": "overview"}), name="threats"),
]
