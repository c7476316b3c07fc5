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
