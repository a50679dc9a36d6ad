"""The suite's own rules: a timeout on every test, exact marker matching, nothing kept in the tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hygiene import marker_names

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_test_runs_under_a_timeout(request):
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"
    assert float(request.config.getini("timeout")) > 0


@pytest.mark.parametrize(("expression", "names_slow"), [
    ("slow", True), ("not slow", True), ("slow or reliability", True), ("(slow)", True),
    ("cuda_slow", False), ("slowest", False), ("reliability", False), ("", False),
])
def test_marker_names_are_whole_words(expression, names_slow):
    assert ("slow" in marker_names(expression)) is names_slow


class _Item:
    """What the collection hook reads of an item: its markers and its keywords."""

    def __init__(self, markers: set[str], keywords: set[str]):
        self.markers, self.keywords, self.added = markers, dict.fromkeys(keywords | markers), []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, marker):
        self.added.append(marker.mark.kwargs["reason"])


class _Config:
    def __init__(self, expression: str):
        self.expression = expression

    def getoption(self, name):
        assert name == "-m"
        return self.expression


def test_slow_tests_skip_by_their_marker_alone():
    from tests import conftest

    marked = _Item({"slow"}, {"test_a"})
    named = _Item(set(), {"test_slow_start", "slow"})  # a parameter id "slow" is a keyword too
    conftest.pytest_collection_modifyitems(_Config("not cuda"), [marked, named])
    assert [r.startswith("slow") for r in marked.added] == [True] and named.added == []
    asked = _Item({"slow"}, {"test_a"})
    conftest.pytest_collection_modifyitems(_Config("slow and reliability"), [asked])
    assert asked.added == []


def test_hypothesis_keeps_nothing_in_the_source_tree():
    from hypothesis import settings
    from hypothesis.configuration import storage_directory

    assert settings().database is None
    home = storage_directory(intent_to_write=False)
    home = Path(getattr(home, "path", home)).resolve()  # a StorageDirectory on newer Hypothesis
    assert home != REPO_ROOT and REPO_ROOT not in home.parents, home
