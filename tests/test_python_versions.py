"""The package supports Python 3.10-3.12 (pyproject's ``requires-python``): every module parses
with the 3.10 grammar, so no newer syntax slips in while development runs on 3.11.

Not tested here: running on 3.10 or 3.12 (this machine has 3.11 only); vermin (``vermin -t=3.10-
src/pddnet``) found no standard-library use newer than 3.10 when the range was widened.
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_requires_python_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3.10,<3.13"$', text, re.M)
    assert (3, 10) <= sys.version_info[:2] <= (3, 12)


def test_sources_parse_with_the_python_3_10_grammar():
    files = sorted((ROOT / "src" / "pddnet").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert len(files) > 50
    bad = []
    for path in files:
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
        except SyntaxError as exc:
            bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert not bad, bad


def test_the_3_10_grammar_check_can_fail():
    # an except* clause (3.11) must be refused by the check above
    try:
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
    except SyntaxError:
        return
    raise AssertionError("ast.parse(feature_version=(3, 10)) accepted 3.11 syntax")
