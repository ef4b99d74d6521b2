"""Property-based run of every operation in the explorer's OpenAPI document (schemathesis, all checks).

Bounded to stay fast: a few examples per operation, no shrinking, a deadline per example. Asserts no 5xx
and every schemathesis check (status codes and bodies as declared, content types, headers, ...).
"""
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from cytosae.explorer import create_app  # noqa: E402
from explorer_fixtures import copy_of, session_run  # noqa: E402

MAX_EXAMPLES = 8
STATUSES: Counter = Counter()
CHECKS_RUN: set[str] = set()


@pytest.fixture(scope="module")
def api_app(tmp_path_factory):
    fx = copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("schemathesis"))
    return create_app(fx.path, allow_hosts=["testserver"])  # the Host schemathesis' ASGI client sends


def test_api_conforms_to_its_schema(api_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    failures = []
    operations = [(r.ok(), mode) for r in schema.get_all_operations() for mode in GenerationMode]
    for operation, mode in operations:

        # a file can match the schema (binary) and still not be an image: 415 is the right answer there, which
        # positive_data_acceptance cannot know; every other check still runs on uploads
        excluded = [positive_data_acceptance] if operation.path == "/api/uploads" else []

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call()
            STATUSES[response.status_code] += 1
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                response.text[:300])
            case.validate_response(response, excluded_checks=excluded)

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.path  # nothing to get wrong in an operation without inputs
        except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {str(exc)[:1500]}")
    total = sum(STATUSES.values())
    print(f"schemathesis: {total} cases ({len(operations)} operation x positive/negative runs) over the OpenAPI document, status counts {dict(sorted(STATUSES.items()))}")
    assert not failures, "\n\n".join(failures)
    assert STATUSES[200] > 0 and STATUSES[403] < total  # it reached the handlers, not only the Host guard
