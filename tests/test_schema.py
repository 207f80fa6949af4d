"""schemathesis against the app's OpenAPI schema: generated requests (valid and not) never get a 5xx, and every
response matches the schema. Authenticated with an admin API key, so the handlers themselves are exercised.

Left out: starting background jobs (a valid request would spawn a training process) and chat completions (a
valid request would load the default model); each has its own tests of bad input."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

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
    schema = schema.exclude(path="/api/jobs", method="POST").exclude(path="/v1/chat/completions")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"})

        run()
        checked.append(operation.label)
    assert len(checked) >= 15, checked
