"""The statistics behind every lesson's verdict: distributions, intervals, and verdicts that concede."""

from __future__ import annotations

import math
import random

import pytest

from workbench.analysis.stats import (
    Estimate,
    Verdict,
    mean_interval,
    paired_difference,
    proportion,
    proportion_difference,
    t_cdf,
    t_quantile,
    welch_difference,
)


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (math.inf, 1.95996)],
)
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-4)


def test_t_cdf_is_a_distribution():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.5, 3) + t_cdf(-1.5, 3) == pytest.approx(1.0)
    xs = [-5, -1, 0, 0.5, 2, 9]
    assert all(t_cdf(x, 5) < t_cdf(y, 5) for x, y in zip(xs, xs[1:]))
    assert t_cdf(t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-9)


def test_mean_interval_by_hand():
    e = mean_interval([1.0, 2.0, 3.0], unit="seeds")
    se = 1.0 / math.sqrt(3)
    assert (e.value, e.se, e.n) == (pytest.approx(2.0), pytest.approx(se), 3)
    assert e.hi - e.value == pytest.approx(4.3027 * se, abs=1e-3)
    assert "t over 3 seeds" in e.describe()


def test_one_repeat_has_no_interval_and_no_verdict():
    e = mean_interval([0.5], unit="seeds")
    assert math.isnan(e.se) and not e.finite and not e.excludes(0.0)
    v = Verdict.compare("A", [1.0], "B", [0.0], paired=True, metric="loss", knob="seeds", better="lower")
    assert v.outcome == "unclear" and v.winner is None
    assert "Cannot tell" in v.text and "`seeds`" in v.text


def test_pairing_tells_what_the_spread_hides():
    base = [3.0, 3.4, 2.7, 3.9]  # seeds differ a lot ...
    a = [x + 0.05 + d for x, d in zip(base, (0.001, -0.002, 0.0015, 0.0))]  # ... A is always 0.05 above
    paired = paired_difference(a, base)
    unpaired = welch_difference(a, base)
    assert paired.excludes(0.0) and not unpaired.excludes(0.0)
    assert paired.value == pytest.approx(unpaired.value)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="one b per a"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="successes <= trials"):
        proportion(5, 3)
    with pytest.raises(ValueError, match="ints"):
        proportion(0.5, 3)
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=95)


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0)])
def test_wilson_matches_published_values(k, n, lo, hi):
    e = proportion(k, n)
    assert (e.lo, e.hi) == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))
    assert e.lo <= e.value <= e.hi


def test_newcombe_matches_his_worked_example():
    # Newcombe (1998), example (a): 56/70 against 48/80, difference 0.2000, 95% interval 0.0524 to 0.3339
    e = proportion_difference(56, 70, 48, 80)
    assert e.value == pytest.approx(0.2)
    assert (e.lo, e.hi) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))


def test_t_interval_covers_at_its_level():
    rng = random.Random(0)
    hits = 0
    reps = 4000
    for _ in range(reps):
        e = mean_interval([rng.gauss(1.0, 2.0) for _ in range(3)])
        hits += e.lo <= 1.0 <= e.hi
    assert 0.93 < hits / reps < 0.97


def test_wilson_covers_where_the_normal_interval_does_not():
    rng = random.Random(1)
    p, n, reps = 0.05, 40, 3000
    wilson = wald = 0
    for _ in range(reps):
        k = sum(rng.random() < p for _ in range(n))
        e = proportion(k, n)
        wilson += e.lo <= p <= e.hi
        half = 1.96 * math.sqrt(k / n * (1 - k / n) / n)
        wald += k / n - half <= p <= k / n + half
    assert wilson / reps > 0.92 > wald / reps


def test_equal_arms_rarely_get_a_verdict():
    rng = random.Random(2)
    decided = 0
    reps = 2000
    for _ in range(reps):
        a = [rng.gauss(0, 1) for _ in range(5)]
        b = [rng.gauss(0, 1) for _ in range(5)]
        decided += Verdict.compare("A", a, "B", b, paired=True, metric="m", knob="seeds").decided
    assert decided / reps < 0.08


def _v(lo, hi, n=5, **kw):
    d = Estimate(value=(lo + hi) / 2, se=(hi - lo) / 4, lo=lo, hi=hi, n=n, unit="seeds", method="t over 5 seeds")
    kw.setdefault("knob", "seeds")
    return Verdict("A", "B", d, metric="loss", **kw)


def test_outcomes_and_words():
    assert _v(0.1, 0.3).outcome == "a" and "is higher than" in _v(0.1, 0.3).text
    lower_wins = _v(0.1, 0.3, better="lower")
    assert lower_wins.winner == "B" and lower_wins.text.startswith("**B** beats **A**")
    assert _v(-0.3, -0.1, better="lower").winner == "A"
    assert _v(-0.3, -0.1, better="higher").winner == "B"
    unclear = _v(-0.1, 0.2, better="lower")
    assert unclear.outcome == "unclear" and "includes zero" in unclear.text and unclear.winner is None
    same = _v(-0.01, 0.02, margin=0.05)
    assert same.outcome == "same" and "equal within" in same.text
    wide = _v(-0.01, 0.2, margin=0.05)
    assert wide.outcome == "unclear" and "margin" in wide.text
    # a difference that excludes zero but fits inside the margin is practically equal
    assert _v(0.001, 0.002, margin=0.05).outcome == "same"


def test_power_threshold_refuses_to_conclude():
    v = _v(0.5, 0.9, n=2)  # clearly positive, but two seeds are below the default threshold of three
    assert v.outcome == "unclear" and "below the 3" in v.text
    assert _v(0.5, 0.9, n=2, min_n=2).outcome == "a"


def test_the_explanation_follows_the_outcome():
    kinds = {"a": "A is bigger", "b": "B is bigger", "same": "they tie", "unclear": "maybe noise"}
    assert _v(0.1, 0.3).explain(**kinds) == "A is bigger"
    assert _v(-0.3, -0.1).explain(**kinds) == "B is bigger"
    assert _v(-0.01, 0.01, margin=0.1).explain(**kinds) == "they tie"
    assert _v(-0.1, 0.1).explain(**kinds) == "*Hypothesis to test:* maybe noise"
    assert _v(0.1, 0.3).explain(b="only for b") == ""
    rec = _v(0.1, 0.3).record(**kinds)
    assert rec["outcome"] == rec["explained"] == "a" and rec["lo"] == 0.1 and rec["n"] == 5


def test_against_a_reference():
    est = proportion(45, 50, unit="drafts")
    v = Verdict.against("acceptance", est, "DeepSeek's 85%", 0.85, metric="acceptance rate", knob="decode_tokens")
    assert v.diff.value == pytest.approx(0.05) and v.outcome == "unclear"
    low = Verdict.against("acceptance", proportion(10, 200), "85%", 0.85, metric="rate", knob="decode_tokens")
    assert low.outcome == "b" and low.record()["reference"] == 0.85


def test_verdict_arguments_are_checked():
    with pytest.raises(ValueError, match="better"):
        _v(0, 1, better="smaller")
    with pytest.raises(ValueError, match="knob"):
        _v(0, 1, knob="")
    with pytest.raises(ValueError, match="margin"):
        _v(0, 1, margin=-1.0)
    with pytest.raises(ValueError, match="min_n"):
        _v(0, 1, min_n=0)


def test_formatting():
    assert mean_interval([1.0, 2.0, 3.0]).fmt(2) == "2.00 ± 2.48"
    assert proportion(1, 4).fmt(2).startswith("0.25 [")
    assert "no interval" in mean_interval([1.0], unit="seeds").fmt()
    v = Verdict.compare(
        "X",
        [0.5, 0.6, 0.55],
        "Y",
        [0.2, 0.25, 0.22],
        paired=True,
        metric="accuracy",
        better="higher",
        knob="seeds",
        scale=100,
        suffix="%",
        digits=1,
    )
    assert v.text.startswith("**X** beats **Y** in accuracy by **32.7%")
