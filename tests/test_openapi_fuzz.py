"""schemathesis drives the served OpenAPI spec: no 5xx, and every answer matches the spec.

Each test generates up to EXAMPLES cases per operation (5 operations, with and without a valid key).
The service is healthy meanwhile (Redis up, stand-in engine up, one worker registered), so any 5xx
is a defect.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from rq import Queue
from schemathesis.config import SchemathesisConfig

from tests.conftest import KEY
from worker import contract
from worker.runner import EngineWorker

EXAMPLES = 200
MIN_CASES = 1000
cases: list[str] = []
# derandomize, no database: hypothesis draws without a random seed and replays nothing from earlier runs.
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
)
# schemathesis's answers that reject a schema-violating request, and 413: a body past MAX_BODY_BYTES is refused
# before it is read, as the spec documents (its negative cases include strings of megabytes). 5xx is listed as
# schemathesis lists it; its check that no answer is a 5xx fails those anyway.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}})


@pytest.fixture
def api_schema(app, redis_conn):
    worker = EngineWorker([Queue(name, connection=redis_conn) for name in contract.QUEUES], connection=redis_conn)
    worker.register_birth()
    yield schemathesis.openapi.from_wsgi("/openapi.json", app, config=CONFIG)
    worker.register_death()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@FUZZ
def test_api_with_a_valid_key(case):
    cases.append(case.operation.label)
    case.call_and_validate(headers={"X-API-Key": KEY})


@schema.parametrize()
@FUZZ
def test_api_without_a_key(case):
    cases.append(case.operation.label)
    case.call_and_validate(headers={"X-API-Key": ""})


def test_at_least_1000_cases_were_generated():
    """Runs after the two above (file order) and checks they covered enough ground."""
    print(f"schemathesis generated {len(cases)} cases")
    assert len(cases) >= MIN_CASES, len(cases)
