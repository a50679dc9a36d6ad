"""Suite-wide hygiene that tests/conftest.py applies: exact marker matching, and a Hypothesis
that keeps nothing in the source tree."""

from __future__ import annotations

import re
import shutil
import tempfile


def marker_names(expression: str) -> set[str]:
    """The marker names a -m expression names, as whole words ("not slow" names slow,
    "cuda_slow" does not)."""
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression)) - {"and", "or", "not"}


def keep_hypothesis_out_of_the_tree() -> str:
    """Hypothesis keeps an example database and its caches under ./.hypothesis: in the working
    tree of whoever runs the tests. No database (every run starts fresh, as in CI), and its
    caches in a temporary directory (returned; remove it when the session ends)."""
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir

    home = tempfile.mkdtemp(prefix="kiln-hypothesis-")
    set_hypothesis_home_dir(home)
    settings.register_profile("kiln", database=None)
    settings.load_profile("kiln")
    return home


def remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
