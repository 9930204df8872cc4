"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    out = scope["out"]
    assert out.shape == (4, 2) and bool(out.isfinite().all())
    assert capsys.readouterr().out.splitlines()[-1].endswith(" 8")  # NFE reported per step
