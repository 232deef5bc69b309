from rest_framework.routers import DefaultRouter

from bridge.api import JobViewSet

router = DefaultRouter(trailing_slash=False)
router.include_root_view = False
router.register("jobs", JobViewSet, basename="job")

urlpatterns = router.urls
