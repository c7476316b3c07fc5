"""Run the shell commands a Markdown file marks runnable, as written, the way a user would follow the page.

A fenced block is runnable when the line right before its opening fence is one of these HTML comments (invisible
where the Markdown is rendered):

    <!-- runnable -->                                 run the block with bash; it must exit 0
    <!-- runnable: background, ready "TEXT" -->       start it in the background (a second terminal), go on once
                                                      its output shows TEXT; stopped (SIGTERM) after the last block

Blocks run in file order, from a user's checkout of the repository (`user_checkout`: the repo's files linked into
a temporary folder, so whatever the commands write, experiments/, reports/, .dpo_local/, lands there), with a
user's environment: none of the test session's variables (HF_HUB_OFFLINE, DPO_*, TINKER_*), Prefect's home and the
HF home in the temporary folder. A variable one block exports is set in the blocks after it, as in one terminal
session; a background block sees what was exported before it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.processes import stop_group

MARKER = re.compile(r'^<!--\s*runnable(?::\s*background,\s*ready\s+"(?P<ready>[^"]+)")?\s*-->\s*$')
FENCE = re.compile(r"^(?P<fence>```+|~~~+)(?P<info>.*)$")
# What a test session sets that a user's shell would not have (tests/conftest.py forces offline mode, etc.).
NOT_A_USERS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT",
               "TINKER_API_KEY", "TINKER_BASE_URL", "PREFECT_API_URL", "PYTEST_CURRENT_TEST", "PYTHONPATH")
# Written by the commands of the docs: a real folder in the user's checkout, never a link into the repository.
WRITTEN = {"experiments", "reports", ".dpo_local", ".prefect", "wandb", ".env", "data", ".pytest_cache", "build"}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    background: bool = False
    ready: str | None = None


def runnable_blocks(markdown: str) -> list[Block]:
    """The blocks marked runnable, in file order."""
    lines = markdown.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        marker = MARKER.match(lines[index].strip())
        fence = FENCE.match(lines[index + 1]) if marker and index + 1 < len(lines) else None
        if not fence:
            if marker:
                raise ValueError(f"line {index + 1}: a runnable marker must be followed by a fenced block")
            index += 1
            continue
        end = next((j for j in range(index + 2, len(lines)) if lines[j].strip() == fence["fence"]), None)
        if end is None:
            raise ValueError(f"line {index + 2}: the fenced block never closes")
        ready = marker["ready"]
        blocks.append(Block(index + 2, "\n".join(lines[index + 2:end]), ready is not None, ready))
        index = end + 1
    return blocks


def user_checkout(repo: Path, folder: Path) -> Path:
    """A checkout in `folder` that shares the repository's files and .venv (links) but writes on its own: `data/`
    is a folder of links (Prefect keeps results under data/.prefect-results), and nothing the docs' commands
    write is linked."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in repo.iterdir():
        if entry.name in WRITTEN or entry.name == ".git":
            continue
        (folder / entry.name).symlink_to(entry)
    (folder / "data").mkdir()
    for entry in (repo / "data").iterdir():
        if not entry.name.startswith("."):
            (folder / "data" / entry.name).symlink_to(entry)
    return folder


def user_environment(home: Path) -> dict[str, str]:
    """This process's environment as a user's shell would have it, with Prefect's and HF's homes under `home`."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_USERS and not k.startswith("DPO_")}
    env.update({"PREFECT_HOME": str(home / "prefect"), "HF_HOME": str(home / "hf-home"), "WANDB_MODE": "disabled"})
    return env


class DocRunner:
    """Runs blocks in one checkout, carrying exported variables from block to block; stops background blocks
    (their whole process group) on exit."""

    def __init__(self, checkout: Path, env: dict[str, str], logs: Path):
        self.checkout, self.env, self.logs = checkout, env, logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state = logs / "exported.sh"
        self.state.write_text("")
        self.background: list[tuple[subprocess.Popen, Path]] = []

    def _script(self, block: Block) -> str:
        # The state file is read first and written last: `export` in one block reaches the next.
        return (f"source {shlex.quote(str(self.state))}\nset -eo pipefail\n{block.code}\n"
                f"export -p > {shlex.quote(str(self.state))}.next && mv {shlex.quote(str(self.state))}.next "
                f"{shlex.quote(str(self.state))}\n")

    def run(self, block: Block, timeout_s: float) -> subprocess.CompletedProcess:
        """Run a foreground block to its end (or start a background one and wait for its ready text)."""
        if block.background:
            return self._start(block, timeout_s)
        return subprocess.run(["bash", "-c", self._script(block)], cwd=self.checkout, env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)

    def _start(self, block: Block, timeout_s: float) -> subprocess.CompletedProcess:
        log = self.logs / f"background-line{block.line}.log"
        script = f"source {shlex.quote(str(self.state))}\nset -eo pipefail\n{block.code}\n"
        with log.open("w") as out:
            process = subprocess.Popen(["bash", "-c", script], cwd=self.checkout, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.background.append((process, log))
        deadline = time.monotonic() + timeout_s
        while block.ready not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                return subprocess.CompletedProcess(process.args, process.poll() or 1, log.read_text(),
                                                   f"background block did not print {block.ready!r}")
            time.sleep(0.2)
        return subprocess.CompletedProcess(process.args, 0, log.read_text(), "")

    def __enter__(self) -> DocRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        for process, _ in self.background:
            stop_group(process)
