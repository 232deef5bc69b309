import re

from django.core.paginator import InvalidPage
from django.db.models import QuerySet
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.views import APIView

# ASCII digits only: int() alone would also take " 7", "1_000" and other scripts' digits.
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _positive_int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    # A blank value is refused like any other non-number: paging is strict, and the schema
    # promises an integer.
    try:
        if not _INTEGER.fullmatch(raw):
            raise ValueError(raw)
        value = int(raw)  # ValueError past Python's 4,300-digit limit too
    except ValueError:
        raise ValidationError({name: [f"A whole number is required, not {raw[:40]!r}."]}) from None
    if value < 1:
        raise ValidationError({name: ["Must be 1 or more."]})
    return value


class Pagination(PageNumberPagination):
    """Page-number pagination with a client-chosen page size, capped to keep pages cheap.

    DRF ignores a malformed `page_size` and answers a malformed `page` with a bare 404; here
    both are a 400 naming the parameter, and a page past the end a 404 naming the last page.
    """

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request: Request) -> int:
        size = _positive_int(request, self.page_size_query_param)
        if size is None:
            return self.page_size
        if size > self.max_page_size:
            raise ValidationError(
                {self.page_size_query_param: [f"Must be {self.max_page_size} or less."]}
            )
        return size

    def paginate_queryset(
        self, queryset: QuerySet, request: Request, view: APIView | None = None
    ) -> list | None:
        number = _positive_int(request, self.page_query_param) or 1
        page_size = self.get_page_size(request)
        paginator = self.django_paginator_class(queryset, page_size)
        try:
            self.page = paginator.page(number)
        except InvalidPage:
            raise NotFound(
                {
                    self.page_query_param: [
                        f"Page {number} does not exist; there are {paginator.num_pages}."
                    ]
                }
            ) from None
        if self.template is not None and paginator.num_pages > 1:
            self.display_page_controls = True
        self.request = request
        return list(self.page)

    def get_schema_operation_parameters(self, view: APIView) -> list[dict]:
        # The limits enforced above, in the schema too: a value it allows is a value we accept.
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
        return parameters
