"""A stand-in for the few Hugging Face Hub routes `create_repo` + `upload_folder` use for small
files, so the real huggingface_hub client code runs offline. Files arrive in `received`."""

from __future__ import annotations

import base64
import json

from fastapi import FastAPI, Request


def hub_app(received: dict, requests: list):
    app = FastAPI()

    @app.post("/api/repos/create")
    async def create(request: Request):
        body = await request.json()
        requests.append(("create", body, request.headers.get("authorization")))
        repo = f"{body.get('organization') or 'user'}/{body['name']}"
        return {"url": f"{request.base_url}{repo}", "name": repo, "id": repo}

    @app.post("/api/validate-yaml")
    async def validate(request: Request):
        requests.append(("validate-yaml", await request.json(), None))
        return {}

    @app.post("/api/models/{ns}/{name}/preupload/{revision}")
    async def preupload(ns: str, name: str, revision: str, request: Request):
        body = await request.json()
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                          for f in body["files"]]}

    @app.post("/api/models/{ns}/{name}/commit/{revision}")
    async def commit(ns: str, name: str, revision: str, request: Request):
        for line in (await request.body()).decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                requests.append(("commit", item["value"], request.headers.get("authorization")))
            elif item["key"] == "file":
                received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return {"commitUrl": f"{request.base_url}{ns}/{name}/commit/abc123", "commitOid": "a" * 40,
                "success": True}

    return app
