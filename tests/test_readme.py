"""The README's promises: its code blocks run, and its set-up commands are the ones CI runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert result.history["val_accuracy"][-1] > 0.8
    assert namespace["probabilities"].shape == (len(namespace["data"].x_test), 10)


def test_ci_runs_the_readme_test_command():
    test_command = re.search(r"# 2\..*\n(.*)\n", README).group(1)
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    pytest_part = test_command.split("&&")[-1].strip()
    assert pytest_part in ci
