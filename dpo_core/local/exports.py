"""The local server's routes for `save_weights_external` and the signed download URLs the SDK fetches them from.

Tinker 0.38's export path: `TrainingClient.save_weights_external(name)` writes `tinker://<run>/external_weights/
<name>`; `RestClient.get_external_weights_urls(path)` returns one signed URL per file, valid until `expires`; a plain
GET (no API key, as from cloud storage) fetches each. Here a URL's signature is an HMAC of the run, name, file and
expiry under the server's API key, so only someone who could ask for it can use it, and only until it expires.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from dpo_core.local import validation as wire
from dpo_core.local.checkpoints import EXTERNAL_FILES
from dpo_core.local.edge import SIGNED_DOWNLOAD_PREFIX, user_error_reply
from dpo_core.local.engine import Engine
from dpo_core.local.validation import UserError

EXTERNAL_URL_TTL_S = 3600  # signed download URLs live an hour, as Tinker's


def add_export_routes(app: FastAPI, engine: Engine, api_key: str, submit: Callable[..., Any],
                      parsed: Callable[..., Any], rest: Callable[[Callable[[], Any]], Any], names: Iterator[int]
                      ) -> None:
    """Register the three routes on `app`; `submit`, `parsed` and `rest` are the server's own helpers."""

    @app.post("/api/v1/save_weights_external")
    async def save_weights_external(request: Request):
        payload = await parsed(request, wire.SaveWeightsExternal)
        if payload.age_encryption_recipients:
            raise UserError("age_encryption_recipients: the local server does not encrypt exports; its files stay "
                            "on this machine (leave it unset)")
        name = payload.path or f"export-{next(names)}"
        return submit(payload.model_id, payload.seq_id, lambda: (json.dumps({
            "type": "save_weights_external", "path": engine.save_external(payload.model_id, name)}).encode(),
            "application/json"))

    def signature(run_id: str, name: str, file_name: str, expires: int) -> str:
        message = f"{run_id}/{name}/{file_name}|{expires}".encode()
        return hmac.new(api_key.encode(), message, hashlib.sha256).hexdigest()

    @app.get("/api/v1/training_runs/{run_id}/checkpoints/external_weights/{name}/external_weights_urls")
    async def external_weights_urls(run_id: str, name: str, request: Request):
        def urls() -> dict[str, Any]:
            folder = engine.checkpoint_dir(f"tinker://{run_id}/external_weights/{name}").folder
            if not folder.is_dir():
                raise UserError(f"checkpoint not found: tinker://{run_id}/external_weights/{name}")
            expires = int(time.time()) + EXTERNAL_URL_TTL_S
            base = str(request.base_url).rstrip("/")
            return {"expires": dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat(), "urls": {
                file_name: f"{base}{SIGNED_DOWNLOAD_PREFIX}{run_id}/{name}/{file_name}?expires={expires}"
                           f"&signature={signature(run_id, name, file_name, expires)}"
                for file_name in EXTERNAL_FILES if (folder / file_name).is_file()}}
        return rest(urls)

    @app.get(SIGNED_DOWNLOAD_PREFIX + "{run_id}/{name}/{file_name}")
    async def external_weights_download(run_id: str, name: str, file_name: str, expires: int = 0,
                                        signature_: str = Query("", alias="signature")):
        if (file_name not in EXTERNAL_FILES or expires < time.time()
                or not hmac.compare_digest(signature_, signature(run_id, name, file_name, expires))):
            return JSONResponse({"error": "invalid or expired download URL; ask for new ones "
                                          "(RestClient.get_external_weights_urls)"}, status_code=403)
        try:
            folder = engine.checkpoint_dir(f"tinker://{run_id}/external_weights/{name}").folder
        except UserError as exc:
            return user_error_reply(exc, 404)
        if not (folder / file_name).is_file():
            return JSONResponse({"error": f"{file_name} not found"}, status_code=404)
        return FileResponse(folder / file_name)
