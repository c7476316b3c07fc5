"""The layout the docs show is the layout as it is: README.md's tree names every top-level folder of the
repository (and only existing ones), and docs/layout.md names every module and benchmark."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def _readme_tree() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def test_readme_tree_names_every_top_level_folder():
    tree = _readme_tree()
    named = {m.group(1) for m in re.finditer(r"^([\w.-]+)/", tree, re.M)}
    folders = {path.split("/")[0] for path in _tracked() if "/" in path and not path.startswith(".")}
    assert folders <= named, f"README.md's layout omits {sorted(folders - named)}"
    assert all((ROOT / name).is_dir() for name in named), f"README.md's layout names a missing folder: {named}"


def test_layout_doc_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    modules = [p for p in _tracked() if re.match(r"(dpo_core|tasks|flows|bench)/.*\.(py|sh)$", p)
               and not p.endswith("__init__.py")]
    missing = [p for p in modules if Path(p).name not in layout]
    assert not missing, f"docs/layout.md does not mention {missing}"
