"""Bad input to the Python API: warm-up sizes, model specs and factory arguments (hypothesis).

Every invalid input is a ValueError naming the bad field or value, raised before Ray starts
and before anything is written to the cache root.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.orchestrator.conftest import TINY
from tests.reliability.support import MODEL, REPO_ROOT, SMALL
from kiln.workers.models.spec import ModelSpecError, build_model, load_factory, parse_model_spec

pytestmark = pytest.mark.reliability

@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or attach to Ray fails the test."""
    import ray

    import kiln.orchestrator.driver as driver

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid input")

    monkeypatch.setattr(driver, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def _bad_size(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or value < 1


size_items = st.one_of(st.integers(min_value=-3, max_value=64), st.booleans(), st.floats(allow_nan=True),
                       st.text(max_size=3), st.none())
invalid_sizes = st.one_of(
    st.just([]),
    st.lists(size_items, min_size=1, max_size=5).filter(lambda xs: any(_bad_size(x) for x in xs)),
    st.tuples(st.integers(max_value=0)),
    st.text(max_size=6),  # "1,2" is the CLI's spelling, not the API's
    st.integers(),
    st.dictionaries(st.integers(min_value=1, max_value=8), st.integers(), min_size=1, max_size=2),
)


@SMALL
@given(sizes=invalid_sizes)
def test_invalid_warmup_sizes_fail_before_ray_starts(no_ray, tmp_path, figure, sizes):
    from kiln.orchestrator import Orchestrator

    figure.scenario = "bad input: Orchestrator.warmup(sizes)"
    root = tmp_path / "root"
    orch = Orchestrator(MODEL, 1, cache_root=str(root), model_kwargs=TINY, progress=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="sizes must be"):
        orch.warmup(sizes)
    figure.observe(time.perf_counter() - start)
    assert not root.exists()


@SMALL
@given(spec=st.one_of(st.text(alphabet="ab_.:/ 1-", max_size=12), st.none(), st.integers(), st.binary(max_size=4)))
def test_model_spec_parses_or_names_itself(figure, spec):
    figure.scenario = "bad input: model spec syntax"
    start = time.perf_counter()
    try:
        target, attr = parse_model_spec(spec)
    except ModelSpecError as exc:
        assert f"model spec {spec!r}" in str(exc)
        figure.observe(time.perf_counter() - start)
    else:
        assert isinstance(spec, str) and f"{target}:{attr}" == spec.strip()


# Targets that cannot exist (a prefix no module has, or a missing directory), and names that
# importlib rejects outright (relative names without a package).
missing_modules = st.from_regex(r"[a-z_]{1,6}(\.[a-z_]{0,4}){0,2}", fullmatch=True).map(lambda s: "kiln_no_such_" + s)
relative_modules = st.from_regex(r"\.{1,3}[a-z_]{0,6}", fullmatch=True)
missing_files = st.from_regex(r"[a-z_]{1,6}", fullmatch=True).map(lambda s: f"no_such_dir/{s}.py")
attrs = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@SMALL
@given(target=st.one_of(missing_modules, relative_modules, missing_files), attr=attrs)
def test_missing_factory_is_a_clear_error(figure, target, attr):
    figure.scenario = "bad input: model spec target"
    start = time.perf_counter()
    with pytest.raises(ModelSpecError) as info:
        load_factory(f"{target}:{attr}")
    figure.observe(time.perf_counter() - start)
    assert target in str(info.value)


# Targets that exist but do not hold a callable of that name → what the error must say.
NOT_A_FACTORY = {
    f"{MODEL.split(':')[0]}:no_such_factory": ["no attribute", "no_such_factory"],
    "examples.toy_llama:no_such_factory": ["no attribute", "no_such_factory"],
    "os:sep": ["'sep'", "not callable"],
}


def test_factory_that_is_missing_or_not_callable(figure):
    figure.scenario = "bad input: model spec factory"
    for spec, words in NOT_A_FACTORY.items():
        start = time.perf_counter()
        with pytest.raises(ModelSpecError) as info:
            load_factory(spec, (str(REPO_ROOT),))
        figure.observe(time.perf_counter() - start)
        assert all(w in str(info.value) for w in words), str(info.value)


POSITIVE_FIELDS = ["layers", "hidden", "heads", "kv_heads", "vocab", "max_seq_len", "max_seqs"]
not_positive = st.one_of(st.integers(max_value=0), st.text(max_size=3), st.floats(max_value=0.5), st.none())
unknown_names = st.from_regex(r"zz_[a-z]{1,6}", fullmatch=True)


@SMALL
@given(kwargs=st.one_of(
    st.builds(lambda name, value: {**TINY, name: value}, st.sampled_from(POSITIVE_FIELDS), not_positive),
    st.builds(lambda name, value: {**TINY, name: value}, unknown_names, st.integers()),
))
def test_bad_factory_arguments_name_the_argument(figure, kwargs):
    figure.scenario = "bad input: model factory arguments"
    bad = next(k for k, v in kwargs.items() if k not in TINY or v != TINY[k])
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        build_model(MODEL, kwargs, (str(REPO_ROOT),))
    figure.observe(time.perf_counter() - start)
    # The cause itself must name the argument, not only the echo of every kwarg before it.
    cause = str(info.value).split(" failed: ", 1)[-1]
    assert bad in cause, str(info.value)
