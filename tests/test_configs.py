"""Gin bindings: a bad value or bad syntax is a one-line error naming the binding."""

import sys

import gin
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmjax import configs, main
from lmjax.models import GPTConfig
from lmjax.train.config import TrainConfig

TINY = "--gin_file=configs/experiments/shakespeare_char_tiny.gin"


@pytest.fixture
def clean_gin(monkeypatch):
    monkeypatch.chdir(main.__file__.rsplit("/lmjax/", 1)[0])  # gin files include by repo path
    gin.clear_config()
    yield
    gin.clear_config()


def _run(capsys, *params: str) -> tuple[int, str]:
    """`lmjax train` of the tiny config with bindings, in this process: (exit code, stderr).
    Every case here fails before any data is read or any step runs."""
    argv = ["lmjax", "train", "--workdir=/tmp/lmjax-never-written", TINY,
            *[f"--gin_param={p}" for p in params]]
    sys_argv, sys.argv = sys.argv, argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            main.main()
    finally:
        sys.argv = sys_argv
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("binding,says", [
    ("train.batch_size='abc'", "train.batch_size = 'abc' is a str, but the field takes int"),
    ("train.batch_size=8.5", "train.batch_size = 8.5 is a float, but the field takes int"),
    ("train.learning_rate='fast'", "train.learning_rate = 'fast' is a str"),
    ("GPTConfig.num_layers=None", "GPTConfig.num_layers = None is a NoneType"),
    ("mesh.data=True", "mesh.data = True is a bool, but the field takes int"),
    ("train.num_steps=((", "(in --gin_param='train.num_steps=((')"),
    ("train.num_stepz=3", "num_stepz"),
])
def test_bad_binding_is_one_line_naming_it(clean_gin, capsys, binding, says):
    code, err = _run(capsys, binding)
    assert code != 0
    assert says in err and err.startswith("lmjax: error: "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


_INT_FIELDS = ("num_steps", "batch_size", "microbatches", "log_every", "seed")
_NOT_INT = st.one_of(st.text(max_size=5), st.floats(allow_nan=True), st.booleans(),
                     st.lists(st.integers(), max_size=2), st.none())


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(_INT_FIELDS), value=_NOT_INT)
def test_any_non_int_value_of_an_int_field_is_refused_by_name(field, value):
    config = TrainConfig(model=GPTConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"^train\.{field} = .* the field takes int"):
        configs.check_types(config, "train")


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 10**9), rate=st.one_of(st.integers(0, 10), st.floats(0, 1)),
       decay=st.one_of(st.none(), st.integers(1, 10**6)), layers=st.integers(1, 64))
def test_values_of_the_right_type_pass(steps, rate, decay, layers):
    config = TrainConfig(model=GPTConfig(num_layers=layers), num_steps=steps,
                         learning_rate=rate, decay_steps=decay)
    configs.check_types(config, "train")
