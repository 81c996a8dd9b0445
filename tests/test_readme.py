"""The README's Python example runs as written against a tiny pipeline's outputs.

The example is the first ```python block under the heading "Use it from Python"; it is run in a
fresh interpreter from a folder laid out like the project (``models/tokenizer``,
``models/generator``, ``data/prepared``), so it uses the pipeline's default paths unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from tests.conftest import REPO
from tests.test_api import build_pipeline

HEADING = "Use it from Python"


def readme_example(text: str) -> str | None:
    """The first ```python block after the heading ``HEADING`` (any level) and before the next
    heading of the same or a higher level; None when there is none. Lines inside fenced blocks
    are never headings (a ``# comment`` in code is not one)."""
    level, fence, block = None, None, None
    for line in text.splitlines(keepends=True):
        if fence is not None:  # inside a fenced block
            if line.strip() == "```":
                if block is not None:
                    return "".join(block)
                fence = None
            elif block is not None:
                block.append(line)
            continue
        if line.startswith("```"):
            fence = line.strip()[3:]
            block = [] if level is not None and fence == "python" else None
            continue
        heading = re.match(r"(#+) (.*?)\s*$", line)
        if heading and level is None and heading.group(2) == HEADING:
            level = len(heading.group(1))
        elif heading and level is not None and len(heading.group(1)) <= level:
            return None
    return None


def _example() -> str:
    example = readme_example((REPO / "README.md").read_text())
    assert example, f"README.md has no ```python block under a '{HEADING}' heading"
    return example


def test_the_example_finder_takes_the_first_python_block_of_its_section():
    text = ("# Top\n```python\nnot this\n```\n## Use it from Python\nprose\n"
            "```bash\n# a comment, not a heading\nnor this\n```\n"
            "```python\nthis = 1\n```\n```python\nnot the second\n```\n## Next\n")
    assert readme_example(text) == "this = 1\n"
    assert readme_example("## Use it from Python\nno code\n## Next\n```python\nx\n```\n") is None


def test_the_readme_python_example_runs_on_the_pipeline_outputs(tmp_path_factory, tmp_path):
    from PIL import Image

    pipeline = build_pipeline(tmp_path_factory.getbasetemp())  # shared with tests/test_api.py
    site = tmp_path / "project"
    for link, target in (("models/tokenizer", "tokenizer"), ("models/generator", "generator"),
                         ("data/prepared", "prepared")):
        (site / link).parent.mkdir(parents=True, exist_ok=True)
        (site / link).symlink_to(pipeline.root / target)
    (site / "example.py").write_text(_example())
    result = subprocess.run([sys.executable, "example.py"], cwd=site, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    pictures = sorted(site.glob("*.png"))
    assert pictures, "the example saves no PNG"
    for path in pictures:
        with Image.open(path) as picture:
            pixels = np.asarray(picture)
        # whole 32x32 images (the tiny pipeline's size), and not blank
        assert pixels.shape[0] % 32 == 0 and pixels.shape[1] % 32 == 0 and pixels.std() > 0, path.name
