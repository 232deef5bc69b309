from django.contrib.admin.apps import AdminConfig


class BridgeAdminConfig(AdminConfig):
    default_site = "bridge.admin_site.BridgeAdminSite"
