"""Property tests (hypothesis) of the CLI option parser ``deqkit.cli.options.parse_options``.

The 0.2 grammar (0.1's ``deqkit.cli.parse_options`` read values with ``ast.literal_eval`` and
exited with ``SystemExit``): ``key=value`` items separated by commas, blank items skipped, dashes
in keys turned into underscores; a value is an integer, a finite float, ``true``/``false``/``none``
(any case), or else the word itself; the vocabulary's numeric options (``NUMERIC_OPTIONS``: ``tol``,
``max_iter``, ``memory``, ``opa_freq``, ``seed``) and the numeric options of ``factory`` must be
numbers (an integer ``>= 0`` where the default is an integer) or ``none``. A malformed item or a bad
value raises :class:`deqkit.OptionError` naming the flag; the command boundary
(``deqkit.cli.dispatch.main``) prints it as one line ``deqkit: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import deqkit as dk  # noqa: E402
from deqkit.errors import OptionError  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)
FLAG = "--opts"


# -- the library calls, one place each -------------------------------------------------------------
def parse(text, factory=None):
    from deqkit.cli.options import parse_options

    return parse_options(text, FLAG, factory)


def numeric_options():
    from deqkit.cli.options import NUMERIC_OPTIONS

    return NUMERIC_OPTIONS


def run_cli(argv):
    """``deqkit ARGV`` in this process: (exit status, stderr)."""
    from deqkit.cli.dispatch import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, err.getvalue()


# -- the reference grammar ---------------------------------------------------------------------------
WORDS = {"true": True, "false": False, "none": None}
VOCABULARY = {"tol": float, "max_iter": int, "memory": int, "opa_freq": int, "seed": int}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cased(word):
    return st.sampled_from([word, word.upper(), word.capitalize()])


finite = st.floats(allow_nan=False, allow_infinity=False)
# (text, value) pairs
values = st.one_of(
    st.integers(-(10**6), 10**6).map(lambda v: (str(v), v)),
    finite.map(lambda v: (repr(v), v)),
    st.sampled_from(sorted(WORDS)).flatmap(lambda w: _cased(w).map(lambda t: (t, WORDS[w]))),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,8}", fullmatch=True)
    .filter(lambda w: w.lower() not in WORDS and not _is_number(w))
    .map(lambda w: (w, w)),
)
keys = st.from_regex(r"[a-z][a-z0-9_\-]{0,11}", fullmatch=True).filter(lambda k: k.replace("-", "_") not in VOCABULARY)
non_finite = st.sampled_from(["nan", "inf", "-inf", "+inf", "Infinity", "-Infinity", "NaN", "1e999", "-1e999"])


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def test_the_vocabulary_of_numeric_options():
    assert numeric_options() == VOCABULARY


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6), st.sampled_from(["", " ", "  "]), st.booleans())
def test_formatted_options_parse_back(opts, pad, trailing_comma):
    """``key=value`` pairs joined by commas parse back to the values; dashes in keys become
    underscores; surrounding spaces and blank items are ignored; a later duplicate key wins."""
    text = ",".join(f"{pad}{k}{pad}={pad}{t}{pad}" for k, (t, _) in opts.items()) + ("," if trailing_comma else "")
    parsed = parse(text)
    expected = {}
    for k, (_, v) in opts.items():
        expected[k.replace("-", "_")] = v
    assert list(parsed) == list(expected)
    for k in expected:
        assert _same(parsed[k], expected[k]), (k, parsed[k], expected[k])


@SETTINGS
@given(keys, non_finite)
def test_a_non_finite_number_is_refused(key, text):
    with pytest.raises(OptionError, match=rf"^{FLAG}: {key.replace('-', '_')} must be a finite number"):
        parse(f"{key}={text}")


@SETTINGS
@given(st.sampled_from(sorted(VOCABULARY)), values)
def test_the_vocabulary_options_are_numbers(key, pair):
    """``tol`` takes any finite number (as a float); the counts take integers ``>= 0``; every one takes ``none``."""
    text, value = pair
    ok = (
        value is None
        or (VOCABULARY[key] is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (VOCABULARY[key] is int and type(value) is int and value >= 0)
    )
    if not ok:
        with pytest.raises(OptionError, match=rf"^{FLAG}: {key} must be "):
            parse(f"{key}={text}")
        return
    out = parse(f"{key}={text}")
    assert list(out) == [key]
    if value is None:
        assert out[key] is None
    else:
        assert type(out[key]) is VOCABULARY[key] and out[key] == value


FACTORY_KINDS = [
    (dk.Anderson, {"memory": int, "regularization": float, "damping": float, "tol": float, "max_iter": int}),
    (dk.Unrolled, {"k": int, "damping": float}),
]


@SETTINGS
@given(st.sampled_from(range(len(FACTORY_KINDS))), st.data())
def test_a_factorys_numeric_options_refuse_words(i, data):
    factory, kinds = FACTORY_KINDS[i]
    key = data.draw(st.sampled_from(sorted(kinds)))
    word = data.draw(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
            lambda w: w.lower() not in WORDS and not _is_number(w)
        )
    )
    with pytest.raises(OptionError, match=rf"^{FLAG}: {key} must be "):
        parse(f"{key}={word}", factory)
    assert parse(f"{key}=1", factory) == {key: 1.0 if kinds[key] is float else 1}


@SETTINGS
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters=",="), max_size=8), min_size=1, max_size=4))
def test_an_item_without_equals_is_a_clean_error(items):
    text = ",".join(items)
    if not text.replace(",", "").strip():
        assert parse(text) == {}  # blank items only: no options at all
        return
    with pytest.raises(OptionError, match=f"^{FLAG} expects key=value pairs"):
        parse(text)


@pytest.mark.parametrize("text", ["=3", "k=", "k= ", " = ", "a=1,=2", "a=1,b"])
def test_an_item_without_a_key_or_a_value_is_a_clean_error(text):
    with pytest.raises(OptionError, match=f"^{FLAG} expects key=value pairs"):
        parse(text)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("ab=,.1e-+ '\"[](){}:")), max_size=30))
def test_any_text_parses_or_is_a_clean_error(text):
    """Whatever is typed, the result is a dict of str keys and plain values, or an ``OptionError``."""
    try:
        out = parse(text)
    except OptionError as err:
        assert str(err).startswith(FLAG), err
        return
    assert isinstance(out, dict) and all(isinstance(k, str) and k for k in out)
    for v in out.values():
        assert v is None or type(v) in (bool, int, str) or (type(v) is float and math.isfinite(v)), out


def test_an_unhashable_literal_is_a_clean_exit():
    """Found by the property test on 0.1 (``ast.literal_eval`` let ``TypeError: unhashable type``
    through; a strict xfail then); the 0.2 parser evaluates no literals: the value is the word."""
    assert parse("k={[]: 1}") == {"k": "{[]: 1}"}
    assert parse("k=[1],j=(2)") == {"k": "[1]", "j": "(2)"}


@SETTINGS
@given(
    st.one_of(
        non_finite.map(lambda t: f"tol={t}"),
        st.sampled_from(["tol=abc", "max_iter=-1", "memory=1.5", "k", "=3", "memory=", "tol=1,seed"]),
    )
)
def test_a_bad_option_string_is_one_error_line_and_status_2(text):
    """Through the command boundary: no traceback, one line ``deqkit: error: --solver-opts ...``, status 2."""
    rc, err = run_cli(["compare", "--solver-opts", text])
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("deqkit: error: --solver-opts"), err


def test_a_bad_option_string_exits_with_status_2_from_the_command_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "deqkit", "compare", "--solver-opts", "tol=abc"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "deqkit: error: --solver-opts: tol must be a finite number, got 'abc'.\n"
    assert os.listdir(tmp_path) == []  # nothing written
