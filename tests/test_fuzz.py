"""Schemathesis generates requests from our OpenAPI schema: no 5xx, and every response conforms to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from litestar.testing import TestClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import AUTH, FAKE_TOML, make_app, wait_loaded


@pytest.fixture(scope="module")
def api_schema() -> Iterator[schemathesis.schemas.BaseSchema]:
    app = make_app(FAKE_TOML)
    with TestClient(app=app) as client:  # runs the lifespan: models load
        wait_loaded(client)
        yield schemathesis.openapi.from_asgi("/schema/openapi.json", app)


def _operations(schema: schemathesis.schemas.BaseSchema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis' own pytest integration (`from_fixture`) does not run under pytest 9 yet, so each operation is
# driven through its Hypothesis strategy directly: the same generation and the same checks.
@pytest.mark.parametrize("with_key", [True, False])
def test_api_conforms(api_schema, with_key):
    operations = _operations(api_schema)
    assert {op.path for op in operations} >= {"/v1/embeddings", "/api/v3/inference/embeddings", "/v1/models"}
    for op in operations:
        if op.path == "/admin/reload":
            continue  # needs a config file; covered in test_operator

        @given(case=op.as_strategy())
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            response = case.call(headers=AUTH if with_key else None)
            assert response.status_code < 500, (case.body, response.text)
            # Schema-valid is not always acceptable: a model name, the token limit and the item limit come from
            # config, not from the schema; those 4xx are asserted in test_errors.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        run()
