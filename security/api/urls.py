from django.urls import path

from security.api import views

urlpatterns = [
    path("auth/login", views.LoginView.as_view(), name="auth-login"),
    path("auth/refresh", views.RefreshView.as_view(), name="auth-refresh"),
    path("auth/logout", views.LogoutView.as_view(), name="auth-logout"),
    path("encrypt", views.CryptoViewSet.as_view({"post": "encrypt"}), name="encrypt"),
    path("decrypt", views.CryptoViewSet.as_view({"post": "decrypt"}), name="decrypt"),
]
