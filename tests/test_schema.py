"""schemathesis against the app's OpenAPI schema: generated requests (valid and not) never get a 5xx, and every
response matches the schema. Authenticated with an admin API key, so the handlers themselves are exercised.

Left out: starting background jobs (a valid request would spawn a training process) and chat and text
completions (a valid request would load the default model); each has its own tests of bad input. Not checked:
that every schema-valid request is accepted (schemathesis' positive_data_acceptance): some rules span fields
(a vote has a choice or a ranking, not both) or the database (an id that exists) and are answered 400/422 in
one line; rules of one field (lengths, counts) are in the schema itself."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from alignloop.core import crud
from alignloop.core.config import load_settings
from alignloop.core.db import make_engine, session_scope
from alignloop.core.workspace import init_workspace
from alignloop.web import create_app


@pytest.fixture(scope="module")
def app_and_key(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "ws"
    init_workspace(path)
    settings = load_settings(path)
    engine = make_engine(settings.db_url)
    with session_scope(engine) as s:
        key, _ = crud.create_api_key(s, user=crud.get_user(s, name="admin"), name="schemathesis")
        (p,), _ = crud.add_prompts(
            s, prompts=[crud.PromptCreate(messages=[{"role": "user", "content": "q"}])], source="t"
        )
        gens = [crud.add_generation(s, prompt_id=p.id, text=t) for t in ("a", "b")]
        crud.create_comparison(s, prompt_id=p.id, generation_ids=[g.id for g in gens])
    return create_app(settings, engine), key


def test_no_server_errors_and_responses_match_the_schema(app_and_key):
    app, key = app_and_key
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    schema = (
        schema.exclude(path="/api/jobs", method="POST")
        .exclude(path="/v1/chat/completions")
        .exclude(path="/v1/completions")
    )
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(
                headers={"Authorization": f"Bearer {key}"}, excluded_checks=[positive_data_acceptance]
            )

        run()
        checked.append(operation.label)
    assert len(checked) >= 15, checked


def test_every_json_endpoint_documents_a_named_response_model(app_and_key):
    """No endpoint answers an untyped dict: each success body is a pydantic model (or a list of one), so the
    schema tells a client what it gets and the response is checked against it on the way out."""
    app, _ = app_and_key
    untyped, checked = [], 0
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if not status.startswith("2") or schema is None:
                    continue
                named = schema.get("items", schema) if schema.get("type") == "array" else schema
                checked += 1
                if "$ref" not in named:
                    untyped.append(f"{method.upper()} {path} {status}")
    assert untyped == [] and checked >= 15
