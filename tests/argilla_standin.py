"""A local HTTP stand-in for an Argilla 2.x server (REST API v1), for testing the sync adapter.

A real Argilla server needs Elasticsearch or OpenSearch, which these machines cannot run, so the tests drive
the real `argilla` client against this small in-memory server instead. It implements the endpoints that the
client's dataset create / records log / records search / users calls use, with the response shapes of
Argilla's documented API (resources with id, inserted_at and updated_at; lists as {"items": [...]}; responses
included in record listings on `include=responses`). Any other call answers 501 and is recorded
in `state["unhandled"]`, so a client upgrade that needs more is noticed rather than silently faked.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _resource(body: dict, **extra) -> dict:
    return {**body, **extra, "id": str(uuid.uuid4()), "inserted_at": _now(), "updated_at": _now()}


def make_standin(api_key: str = "alignloop-test-key"):
    app = FastAPI()
    owner = _resource({"username": "owner", "role": "owner", "first_name": "Owner", "last_name": None})
    state: dict = {
        "users": {owner["id"]: owner},
        "workspaces": {},
        "datasets": {},
        "unhandled": [],
        "owner": owner,
    }

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.headers.get("X-Argilla-Api-Key") != api_key:
            return JSONResponse({"detail": "Could not validate credentials"}, status_code=401)
        return await call_next(request)

    def dataset(dataset_id: str) -> dict:
        if dataset_id not in state["datasets"]:
            raise HTTPException(404, detail=f"Dataset with id `{dataset_id}` not found")
        return state["datasets"][dataset_id]

    @app.get("/api/v1/me")
    def me():
        return owner

    @app.get("/api/v1/version")
    def version():
        return {"version": "2.8.0"}

    @app.get("/api/v1/status")
    def status():
        return {"version": "2.8.0", "search_engine": {}, "memory": {}}

    @app.get("/api/v1/users/{user_id}")
    def get_user(user_id: str):
        if user_id not in state["users"]:
            raise HTTPException(404, detail="user not found")
        return state["users"][user_id]

    @app.post("/api/v1/workspaces")
    def create_workspace(body: dict):
        ws = _resource({"name": body["name"]})
        state["workspaces"][ws["id"]] = ws
        return ws

    @app.get("/api/v1/me/workspaces")
    def my_workspaces():
        return {"items": list(state["workspaces"].values())}

    @app.get("/api/v1/workspaces/{workspace_id}")
    def get_workspace(workspace_id: str):
        if workspace_id not in state["workspaces"]:
            raise HTTPException(404, detail="workspace not found")
        return state["workspaces"][workspace_id]

    @app.get("/api/v1/me/datasets")
    def my_datasets():
        return {"items": [d["dataset"] for d in state["datasets"].values()]}

    @app.post("/api/v1/datasets")
    def create_dataset(body: dict):
        if any(
            d["dataset"]["name"] == body["name"] and d["dataset"]["workspace_id"] == body["workspace_id"]
            for d in state["datasets"].values()
        ):
            raise HTTPException(409, detail="dataset already exists")
        ds = _resource(body, status="draft", last_activity_at=_now())
        state["datasets"][ds["id"]] = {
            "dataset": ds,
            "fields": [],
            "questions": [],
            "metadata": [],
            "records": [],
        }
        return ds

    @app.get("/api/v1/datasets/{dataset_id}")
    def get_dataset(dataset_id: str):
        return dataset(dataset_id)["dataset"]

    @app.patch("/api/v1/datasets/{dataset_id}")
    def update_dataset(dataset_id: str, body: dict):
        d = dataset(dataset_id)["dataset"]
        d.update(
            {
                k: v
                for k, v in body.items()
                if k in ("name", "guidelines", "allow_extra_metadata", "distribution")
            }
        )
        d["updated_at"] = _now()
        return d

    @app.delete("/api/v1/datasets/{dataset_id}")
    def delete_dataset(dataset_id: str):
        return (
            state["datasets"].pop(dataset_id)["dataset"]
            if dataset_id in state["datasets"]
            else dataset(dataset_id)
        )

    @app.put("/api/v1/datasets/{dataset_id}/publish")
    def publish(dataset_id: str):
        d = dataset(dataset_id)
        if not d["fields"] or not d["questions"]:
            raise HTTPException(422, detail="a dataset needs fields and questions to be published")
        d["dataset"]["status"] = "ready"
        return d["dataset"]

    for kind, path in (("fields", "fields"), ("questions", "questions"), ("metadata", "metadata-properties")):

        def create(dataset_id: str, body: dict, kind=kind):
            item = _resource(body, dataset_id=dataset_id)
            dataset(dataset_id)[kind].append(item)
            return item

        def listing(dataset_id: str, kind=kind):
            return {"items": dataset(dataset_id)[kind]}

        app.post(f"/api/v1/datasets/{{dataset_id}}/{path}")(create)
        app.get(f"/api/v1/datasets/{{dataset_id}}/{path}")(listing)
        app.get(f"/api/v1/me/datasets/{{dataset_id}}/{path}")(listing)

    @app.get("/api/v1/datasets/{dataset_id}/vectors-settings")
    def vectors(dataset_id: str):
        dataset(dataset_id)
        return {"items": []}

    @app.put("/api/v1/datasets/{dataset_id}/records/bulk")
    def upsert_records(dataset_id: str, body: dict):
        d = dataset(dataset_id)
        if d["dataset"]["status"] != "ready":
            raise HTTPException(422, detail="records can only be added to a published dataset")
        by_external = {r["external_id"]: r for r in d["records"]}
        updated, out = [], []
        for item in body["items"]:
            existing = by_external.get(item.get("external_id"))
            if existing is not None:
                existing.update(
                    {k: v for k, v in item.items() if k in ("fields", "metadata")}, updated_at=_now()
                )
                updated.append(existing["id"])
                out.append(existing)
                continue
            record = _resource(
                {
                    "external_id": item.get("external_id"),
                    "fields": item["fields"],
                    "metadata": item.get("metadata") or {},
                },
                dataset_id=dataset_id,
                status="pending",
                responses=[],
                suggestions=[],
                vectors={},
            )
            d["records"].append(record)
            out.append(record)
        return {"items": out, "updated_item_ids": updated}

    @app.get("/api/v1/datasets/{dataset_id}/records")
    def list_records(dataset_id: str, request: Request, offset: int = 0, limit: int = 100):
        include = request.query_params.getlist("include")
        page = dataset(dataset_id)["records"][offset : offset + limit]
        return {"items": [{**r, "responses": r["responses"] if "responses" in include else []} for r in page]}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unhandled(path: str, request: Request):
        state["unhandled"].append(f"{request.method} /{path}")
        return JSONResponse(
            {"detail": f"not implemented by the test stand-in: {request.method} /{path}"}, 501
        )

    def add_annotator(username: str) -> str:
        user = _resource(
            {"username": username, "role": "annotator", "first_name": username, "last_name": None}
        )
        state["users"][user["id"]] = user
        return user["id"]

    def respond(
        dataset_id: str,
        external_id: str,
        user_id: str,
        value,
        status: str = "submitted",
        question: str = "preference",
    ) -> None:
        """What an annotator's click in Argilla's UI leaves on the server. A ranking is given as the values best
        first and stored in the wire format, [{"value": ..., "rank": n}]."""
        if question == "ranking":
            value = [{"value": v, "rank": i + 1} for i, v in enumerate(value)]
        record = next(r for r in dataset(dataset_id)["records"] if r["external_id"] == external_id)
        record["responses"].append(
            _resource({"values": {question: {"value": value}}, "status": status, "user_id": user_id})
        )

    def add_workspace(name: str) -> str:
        ws = _resource({"name": name})
        state["workspaces"][ws["id"]] = ws
        return ws["id"]

    def find(name: str) -> dict:
        return next(d for d in state["datasets"].values() if d["dataset"]["name"] == name)

    state["add_annotator"], state["respond"], state["add_workspace"] = add_annotator, respond, add_workspace
    state["find"] = find
    return app, state
