"""The runnable-docs harness: which blocks it runs, and that exports carry from block to block."""

from __future__ import annotations

import pytest

from tests.helpers.runnable_docs import DocRunner, runnable_blocks

PAGE = '''# Title

```bash
echo not marked
```

<!-- runnable -->
```bash
export GREETING=hello
echo one
```

<!-- runnable: background, ready "listening" -->
```bash
echo listening; sleep 30
```

<!-- runnable -->
~~~sh
echo "$GREETING two"
~~~
'''


def test_only_marked_blocks_are_taken_with_their_mode():
    blocks = runnable_blocks(PAGE)
    assert [(b.line, b.code, b.background, b.ready) for b in blocks] == [
        (8, "export GREETING=hello\necho one", False, None),
        (14, "echo listening; sleep 30", True, "listening"),
        (19, 'echo "$GREETING two"', False, None),
    ]


def test_a_marker_without_a_block_is_an_error():
    with pytest.raises(ValueError, match="line 1: a runnable marker must be followed by a fenced block"):
        runnable_blocks("<!-- runnable -->\ntext\n")


def test_blocks_share_exports_and_background_blocks_are_stopped(tmp_path):
    blocks = runnable_blocks(PAGE)
    with DocRunner(tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path / "logs") as runner:
        outputs = [runner.run(block, timeout_s=20) for block in blocks]
        background = runner.background[0][0]
    assert [o.returncode for o in outputs] == [0, 0, 0]
    assert outputs[2].stdout == "hello two\n"
    assert background.poll() is not None  # stopped on exit, not left sleeping


def test_a_failing_command_fails_its_block(tmp_path):
    [block] = runnable_blocks("<!-- runnable -->\n```bash\nfalse\necho after\n```\n")
    with DocRunner(tmp_path, {"PATH": "/usr/bin:/bin"}, tmp_path / "logs") as runner:
        done = runner.run(block, timeout_s=20)
    assert done.returncode != 0 and "after" not in done.stdout


def test_readme_commands_are_the_ones_the_quickstart_test_runs():
    """README.md's runnable blocks run as written: each is a block of docs/quickstart.md, which
    tests/flows/test_quickstart.py runs in order from a user's checkout, and in the same order there."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = runnable_blocks((root / "README.md").read_text())
    quickstart = [(b.code, b.background, b.ready) for b in runnable_blocks((root / "docs" / "quickstart.md").read_text())]
    assert readme, "README.md marks no block runnable"
    positions = []
    for block in readme:
        key = (block.code, block.background, block.ready)
        assert key in quickstart, f"README.md line {block.line}: not a runnable block of docs/quickstart.md:\n{block.code}"
        positions.append(quickstart.index(key))
    assert positions == sorted(positions), "README.md runs the quick start's blocks in another order"


def test_readme_is_a_manual_not_a_notebook():
    """Under 300 lines, no issue numbers or commit hashes, and every relative link resolves."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    assert len(text.splitlines()) < 300
    assert not re.search(r"\bissue \d+", text, re.I)
    assert not re.search(r"\bcommit `?[0-9a-f]{7,40}\b", text)
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (root / target).exists(), f"README.md links to {target}, which does not exist"
