from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    """Page-number pagination with a client-chosen page size, capped to keep pages cheap."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
