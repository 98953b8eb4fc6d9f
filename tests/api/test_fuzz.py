"""Schemathesis generates requests from our OpenAPI schema: no 5xx, every response conforms to the schema, and
with a key every schema-valid request is accepted (the schema states what the API enforces)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from litestar.testing import TestClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ..conftest import AUTH, make_app, wait_loaded

# CI runs the same examples every time (Hypothesis derandomized: its seed comes from the test, not the clock): a
# random run may meet a new failing example, or another share of 200s, on a commit that changed nothing, which
# fails CI by chance. FUZZ_EXPLORE=1 draws new examples each run, for a person hunting bugs; what it finds belongs
# in a test of its own.
EXPLORE = os.environ.get("FUZZ_EXPLORE", "0") not in ("", "0")

# Limits the schema states, and a fake model that takes whatever fits them: so a schema-valid request is one
# the API accepts, and `positive_data_acceptance` can hold.
FUZZ_TOML = """
[server]
max_items_per_request = 16
max_input_chars = 300
max_tokens_per_request = 100000

[models.fake]
backend = "fake"
path = "."
aliases = ["fake-alias"]
matryoshka_dimensions = [2, 4, 8]
prompts = {query = "query: ", document = "passage: "}
[models.fake.options]
max_tokens = 1000

[models.ranker]
backend = "fake-rerank"
path = "."
task = "rerank"
[models.ranker.options]
max_tokens = 1000
"""


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.schemas.BaseSchema]:
    # From a file, so that POST /admin/reload has one to re-read and is fuzzed like every other operation.
    config = tmp_path_factory.mktemp("fuzz") / "gateway.toml"
    config.write_text(FUZZ_TOML)
    app = make_app("", config_path=config)
    with TestClient(app=app) as client:  # runs the lifespan: models load
        wait_loaded(client)
        # Fetched with a key: only a key's schema names the models, prompts and dimensions it may use.
        yield schemathesis.openapi.from_asgi("/schema/openapi.json", app, headers=AUTH)


def _operations(schema: schemathesis.schemas.BaseSchema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis' own pytest integration (`from_fixture`) does not run under pytest 9 yet, so each operation is
# driven through its Hypothesis strategy directly: the same generation and the same checks.
@pytest.mark.parametrize("with_key", [True, False])
def test_api_conforms(api_schema, with_key):
    operations = _operations(api_schema)
    assert {op.path for op in operations} >= {
        "/v1/embeddings",
        "/api/v3/inference/embeddings",
        "/v1/models",
        "/admin/reload",
        "/admin/cache/clear",
        "/v1/rerank",
        "/v2/rerank",
        "/api/v3/inference/rerank",
        "/rerank",
        "/embed",
        "/tokenize",
        "/api/embed",
        "/api/embeddings",
        "/v2/embed",
    }
    statuses: Counter[int] = Counter()
    for op in operations:
        _fuzz(op, with_key, statuses)
    if with_key:
        assert statuses[200] > 0.5 * sum(statuses.values()), statuses


def _fuzz(op, with_key: bool, statuses: Counter[int]) -> None:
    embeddings = op.path.endswith(("/embeddings", "rerank", "/embed"))

    @given(case=op.as_strategy())
    @settings(
        max_examples=300 if embeddings and with_key else 50,
        deadline=None,
        derandomize=not EXPLORE,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case) -> None:
        # A client's own deadline can make a valid request time out or be refused, which no schema can
        # say (test_admission has its tests): the header stays, with a deadline no request here misses.
        if case.headers and "X-Request-Timeout-Ms" in case.headers:
            case.headers["X-Request-Timeout-Ms"] = "120000"
        response = case.call(headers=AUTH if with_key else None)
        assert response.status_code < 500, (case.body, response.text)
        if embeddings:
            statuses[response.status_code] += 1
        # Without a key every call is a 401, which the schema cannot express as a condition of the data.
        case.validate_response(response, excluded_checks=[] if with_key else [positive_data_acceptance])

    run()
