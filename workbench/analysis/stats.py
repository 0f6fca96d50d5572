"""Statistics for the lessons: how sure a measurement is, and a verdict that only concludes beyond the noise.

A lesson that trains two models once and prints "A beat B" has measured one draw of a random process:
another seed (another initialisation, another order of batches) can reverse the sign. This module
gives every comparison its noise and lets the same condition choose both the verdict and the
explanation printed beside it, so that a lesson can never explain a result it did not get.

Estimates (``Estimate``: a value with a confidence interval, 95% unless asked):

* ``mean_interval(values)``: the mean of independent repeats (seeds, problems, batches) with its
  standard error s / sqrt(n) and Student's t interval (n - 1 degrees of freedom). One value has no
  spread to measure: its interval is infinite.
* ``paired_difference(a, b)``: the mean of a_i - b_i over *paired* repeats: seed i of arm A and seed i
  of arm B start from the same initialisation and see the same batches, or problem i is answered by
  both models. Pairing removes what the two arms share, so it tells differences far smaller than the
  spread of either arm.
* ``welch_difference(a, b)``: the difference of two means from unpaired samples (Welch's t interval,
  Welch-Satterthwaite degrees of freedom).
* ``proportion(k, n)``: an accuracy of k right out of n with Wilson's score interval, which stays
  inside [0, 1] and is honest at 0 of n and n of n (where p(1 - p)/n claims no noise at all).
* ``proportion_difference(k1, n1, k2, n2)``: two independent accuracies, Newcombe's hybrid score
  interval built from the two Wilson intervals.

Several samples of the same problem are not independent (a model that knows the answer gives it four
times). For accuracies over problems x samples, pass one rate per problem to ``mean_interval`` or
``paired_difference``: the problems are the independent units.

``Verdict`` compares arm A with arm B (``Verdict.compare``) or a measurement with a reference value
(``Verdict.against``). Its ``outcome`` is

* ``"a"`` or ``"b"``: the interval of A - B excludes zero, so the one it favours is larger
  (``better`` says whether larger is better, which turns "larger" into "beats");
* ``"same"``: a ``margin`` was given and the whole interval lies inside [-margin, margin];
* ``"unclear"``: the interval includes zero, or the comparison has fewer than ``min_n`` repeats (its
  *power threshold*: below it the lesson refuses to conclude whatever the numbers say, so a CI-scale
  run with two seeds can never print a conclusion). The text then says which knob would tell.

``verdict.explain(a=..., b=..., same=..., unclear=...)`` returns the explanation for the outcome it
got. The keys name the outcome, not the winner: ``a`` is printed when A is *larger*, so with
``better="lower"`` (losses, MaxVio) the ``a`` text must explain why A *lost*. (The explanation is
chosen by the same condition as the sentence; the notebook test checks that, but it cannot read
prose, so write each text for its outcome.) An unclear one is printed as a hypothesis to test.
``verdict.show(...)`` displays sentence and explanation in a notebook with the numbers in the output's metadata
(``workbench_verdict``), where ``tests/test_notebooks.py`` re-derives the outcome and checks the text.

A lesson uses it like this (lesson 4, paired over seeds; lower loss is better)::

    v = Verdict.compare("with MTP", loss_mtp, "without MTP", loss_plain, metric="validation loss",
                        better="lower", paired=True, unit="seeds", knob="seeds")
    v.show(a="MTP (larger loss) cost the main model ...", b="MTP's extra target helped ...", unclear="...")

Where it simplifies: intervals are two-sided at one level; several comparisons in one lesson are not
corrected for multiplicity (each verdict is its own test, at 95% about one in twenty unclear
differences would still be called); t intervals assume roughly normal repeats, which a handful of
seeds cannot check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

LEVEL = 0.95  # two-sided confidence level of every interval unless asked otherwise
MIN_N = 3  # default power threshold: fewer repeats than this and a verdict refuses to conclude
VERDICT_KEY = "workbench_verdict"  # the output metadata key the notebook test reads
OUTCOMES = ("a", "b", "same", "unclear")


# Distributions -------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, as in Numerical Recipes)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (normal for infinite df)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(df):
        return NormalDist().cdf(x)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The x with P(T <= x) = p (bisection on ``t_cdf``; t(0.975, 1) = 12.706, t(0.975, 4) = 2.776)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# Estimates -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A measured value with its standard error and a two-sided confidence interval [lo, hi]."""

    value: float
    se: float  # standard error (nan when it cannot be measured, e.g. from one repeat)
    lo: float
    hi: float
    n: int  # independent repeats behind it (seeds, problems, batches)
    level: float = LEVEL
    method: str = ""  # how the interval was made, in words
    unit: str = ""  # what the repeats are: "seeds", "problems", ...

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval lies wholly on one side of ``x``."""
        return self.finite and (self.lo > x or self.hi < x)

    def fmt(self, digits: int = 3, scale: float = 1.0, suffix: str = "", signed: bool = False) -> str:
        """``value ± half-width`` (symmetric intervals) or ``value [lo, hi]`` (Wilson's, asymmetric)."""
        sign = "+" if signed else ""
        v = f"{self.value * scale:{sign}.{digits}f}{suffix}"
        if not self.finite:
            return f"{v} (no interval: {self.n} {self.unit or 'repeats'})"
        mid = (self.lo + self.hi) / 2.0
        if abs(mid - self.value) <= 1e-9 * max(1.0, abs(self.value)) + 1e-12:
            return f"{v} ± {self.half_width * scale:.{digits}f}{suffix}"
        return f"{v} [{self.lo * scale:.{digits}f}, {self.hi * scale:.{digits}f}]{suffix}"

    def describe(self) -> str:
        """How sure: ``95% interval, t over 3 seeds``."""
        return f"{self.level:.0%} interval, {self.method}" if self.method else f"{self.level:.0%} interval"


def _values(values: Sequence[float], name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} is empty: a measurement needs at least one value")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} holds NaN or inf ({out}); measure again or drop the diverged run")
    return out


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")


def mean_interval(values: Sequence[float], level: float = LEVEL, unit: str = "repeats") -> Estimate:
    """Mean of independent repeats with its standard error and Student's t interval."""
    _check_level(level)
    xs = _values(values, "values")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, math.nan, -math.inf, math.inf, n, level, f"one {unit.rstrip('s')}: no spread", unit)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Estimate(mean, se, mean - half, mean + half, n, level, f"t over {n} {unit}", unit)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL, unit: str = "seeds") -> Estimate:
    """Mean of a_i - b_i over paired repeats (same seed, same problem), with its t interval."""
    xa, xb = _values(a, "a"), _values(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"paired values need one b per a: got {len(xa)} and {len(xb)}")
    est = mean_interval([x - y for x, y in zip(xa, xb)], level, unit)
    return Estimate(est.value, est.se, est.lo, est.hi, est.n, level, f"paired {est.method}", unit)


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL, unit: str = "repeats") -> Estimate:
    """mean(a) - mean(b) from independent samples: Welch's t interval (needs two values on each side)."""
    _check_level(level)
    xa, xb = _values(a, "a"), _values(b, "b")
    ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
    n = min(len(xa), len(xb))
    if n < 2:
        return Estimate(ma - mb, math.nan, -math.inf, math.inf, n, level, f"one of the sides has one {unit}", unit)
    va = sum((x - ma) ** 2 for x in xa) / (len(xa) - 1) / len(xa)
    vb = sum((x - mb) ** 2 for x in xb) / (len(xb) - 1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Estimate(ma - mb, 0.0, ma - mb, ma - mb, n, level, f"Welch over {len(xa)} and {len(xb)} {unit}", unit)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = t_quantile(0.5 + level / 2.0, df) * se
    method = f"Welch over {len(xa)} and {len(xb)} {unit}"
    return Estimate(ma - mb, se, ma - mb - half, ma - mb + half, n, level, method, unit)


def _counts(successes: int, trials: int) -> tuple[int, int]:
    if not isinstance(successes, int) or not isinstance(trials, int) or isinstance(successes, bool):
        raise ValueError(f"successes and trials must be ints, got {successes!r} and {trials!r}")
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    return successes, trials


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends, where rounding would leave 1e-17
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def proportion(successes: int, trials: int, level: float = LEVEL, unit: str = "trials") -> Estimate:
    """k of n with Wilson's score interval (asymmetric, inside [0, 1], honest at 0 of n)."""
    _check_level(level)
    k, n = _counts(successes, trials)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    lo, hi = _wilson(k, n, z)
    p = k / n
    return Estimate(p, math.sqrt(p * (1 - p) / n), lo, hi, n, level, f"Wilson, {k} of {n} {unit}", unit)


def proportion_difference(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL, unit: str = "trials") -> Estimate:
    """p1 - p2 of two independent proportions: Newcombe's hybrid score interval (method 10)."""
    _check_level(level)
    (k1, n1), (k2, n2) = _counts(k1, n1), _counts(k2, n2)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = _wilson(k1, n1, z)
    l2, u2 = _wilson(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    method = f"Newcombe, {k1} of {n1} against {k2} of {n2} {unit}"
    return Estimate(d, se, lo, hi, min(n1, n2), level, method, unit)


# Verdicts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """A comparison of A with B that concludes only beyond its noise (see the module docstring)."""

    a: str  # name of arm A (or of the measurement)
    b: str  # name of arm B (or of the reference)
    diff: Estimate  # of A - B
    metric: str  # what was measured, in words: "validation loss"
    knob: str  # the parameter to raise when the budget cannot tell: "seeds", "steps", "eval_problems"
    better: str | None = None  # "higher", "lower" or None (no side is better: "is higher than")
    min_n: int = MIN_N  # power threshold: below this many repeats, no conclusion
    margin: float | None = None  # |A - B| inside this counts as equal (the whole interval must fit)
    digits: int = 3
    scale: float = 1.0  # displayed values are multiplied by this (100 with suffix "%" for percents)
    suffix: str = ""
    claim: str | None = None  # the ledger claim this verdict bears on (workbench.analysis.claims)
    reference: float | None = None  # B's value when B is a fixed reference (Verdict.against)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else for the metadata

    def __post_init__(self) -> None:
        if self.better not in (None, "higher", "lower"):
            raise ValueError(f"better must be 'higher', 'lower' or None, got {self.better!r}")
        if not isinstance(self.min_n, int) or self.min_n < 1:
            raise ValueError(f"min_n must be a positive int (the fewest repeats that may conclude), got {self.min_n!r}")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"margin must be a positive number or None, got {self.margin!r}")
        if not self.knob:
            raise ValueError(
                "knob must name the parameter that would tell (e.g. 'seeds'); a verdict owes its reader that"
            )

    # construction ---------------------------------------------------------------------------------
    @classmethod
    def compare(
        cls,
        a: str,
        values_a: Sequence[float],
        b: str,
        values_b: Sequence[float],
        *,
        paired: bool,
        unit: str = "seeds",
        level: float = LEVEL,
        **kwargs: Any,
    ) -> Verdict:
        """A against B from repeats of each: paired (same seeds / problems) or Welch's unpaired."""
        est = (paired_difference if paired else welch_difference)(values_a, values_b, level, unit)
        return cls(a, b, est, **kwargs)

    @classmethod
    def against(cls, a: str, estimate: Estimate, b: str, reference: float, **kwargs: Any) -> Verdict:
        """A measurement against a fixed reference value (a published figure, a threshold)."""
        if not math.isfinite(reference):
            raise ValueError(f"reference must be a finite number, got {reference}")
        e = estimate
        diff = Estimate(e.value - reference, e.se, e.lo - reference, e.hi - reference, e.n, e.level, e.method, e.unit)
        return cls(a, b, diff, reference=reference, **kwargs)

    # the decision ---------------------------------------------------------------------------------
    @property
    def underpowered(self) -> bool:
        return self.diff.n < self.min_n or not self.diff.finite

    @property
    def outcome(self) -> str:
        """``"a"``/``"b"`` (that side is larger), ``"same"`` (inside the margin) or ``"unclear"``."""
        d = self.diff
        if self.underpowered:
            return "unclear"
        if self.margin is not None and -self.margin <= d.lo and d.hi <= self.margin:
            return "same"
        if d.lo > 0:
            return "a"
        if d.hi < 0:
            return "b"
        return "unclear"

    @property
    def winner(self) -> str | None:
        """The better arm's name when the verdict concludes and ``better`` is set, else None."""
        o = self.outcome
        if o not in ("a", "b") or self.better is None:
            return None
        larger_wins = self.better == "higher"
        return (self.a if o == "a" else self.b) if larger_wins else (self.b if o == "a" else self.a)

    @property
    def decided(self) -> bool:
        return self.outcome != "unclear"

    # the words ------------------------------------------------------------------------------------
    def _num(self, x: float, signed: bool = False) -> str:
        return f"{x * self.scale:{'+' if signed else ''}.{self.digits}f}{self.suffix}"

    def _interval(self) -> str:
        d = self.diff
        shown = d.fmt(self.digits, self.scale, self.suffix, signed=True)
        return f"{shown} ({d.describe()})"

    @property
    def text(self) -> str:
        """The sentence: who beats whom by how much, equality within the margin, or cannot tell and why."""
        d, o = self.diff, self.outcome
        how = d.describe()
        if o in ("a", "b"):
            larger, smaller = (self.a, self.b) if o == "a" else (self.b, self.a)
            by = f"**{self._num(abs(d.value))} ± {self._num(d.half_width)}** ({how})"
            if self.better is None:
                return f"**{larger}** is higher than **{smaller}** in {self.metric} by {by}."
            win, lose = (larger, smaller) if self.better == "higher" else (smaller, larger)
            return f"**{win}** beats **{lose}** in {self.metric} by {by}."
        rel = f"{self.a} − {self.b} = {self._interval()}"
        if o == "same":
            return (
                f"**{self.a}** and **{self.b}** are **equal within ±{self._num(self.margin)}** in {self.metric}: {rel}."
            )
        if self.underpowered:
            why = (
                f"{d.n} {d.unit or 'repeats'} are below the {self.min_n} this comparison needs before it concludes"
                if d.n < self.min_n
                else f"{d.n} {d.unit or 'repeat'} give no estimate of the noise"
            )
        else:
            why = "an interval that includes zero" + (
                f" and reaches beyond the ±{self._num(self.margin)} margin" if self.margin is not None else ""
            )
        return (
            f"**Cannot tell** {self.a} from {self.b} in {self.metric} at this budget: {rel}; {why}. "
            f"Raise `{self.knob}` to tell."
        )

    def explain(self, a: str = "", b: str = "", same: str = "", unclear: str = "") -> str:
        """The explanation for the outcome this verdict got; an unclear one is offered as a hypothesis."""
        chosen = {"a": a, "b": b, "same": same, "unclear": unclear}[self.outcome]
        if not chosen:
            return ""
        return f"*Hypothesis to test:* {chosen}" if self.outcome == "unclear" else chosen

    def record(self, **explanations: str) -> dict[str, Any]:
        """What the notebook test re-derives the outcome from, and what was printed."""
        d = self.diff
        return {
            "a": self.a,
            "b": self.b,
            "metric": self.metric,
            "value": d.value,
            "lo": d.lo if d.finite else None,
            "hi": d.hi if d.finite else None,
            "n": d.n,
            "unit": d.unit,
            "min_n": self.min_n,
            "margin": self.margin,
            "better": self.better,
            "knob": self.knob,
            "outcome": self.outcome,
            "winner": self.winner,
            "text": self.text,
            "explained": self.outcome if explanations.get(self.outcome) else None,
            "explanation": self.explain(**explanations),  # what was printed after the sentence
            "explanations": {o: explanations.get(o, "") for o in OUTCOMES},  # all four, so a test can see the choice
            "claim": self.claim,
            "reference": self.reference,
            "estimate": {k: v for k, v in asdict(d).items() if k != "level"},
            **self.extra,
        }

    def markdown(self, a: str = "", b: str = "", same: str = "", unclear: str = "") -> str:
        why = self.explain(a=a, b=b, same=same, unclear=unclear)
        return self.text + (f" {why}" if why else "")

    def show(self, a: str = "", b: str = "", same: str = "", unclear: str = "") -> None:
        """Display the verdict (and the explanation its outcome chose) in a notebook."""
        from IPython.display import Markdown, display

        explanations = {"a": a, "b": b, "same": same, "unclear": unclear}
        display(Markdown(self.markdown(**explanations)), metadata={VERDICT_KEY: self.record(**explanations)})


def describe(estimate: Estimate, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """``0.742 [0.70, 0.78] (95% interval, Wilson, 380 of 512 samples)``: a number with its noise, for prose."""
    return f"{estimate.fmt(digits, scale, suffix)} ({estimate.describe()})"


__all__ = [
    "LEVEL",
    "MIN_N",
    "OUTCOMES",
    "VERDICT_KEY",
    "Estimate",
    "Verdict",
    "describe",
    "mean_interval",
    "paired_difference",
    "proportion",
    "proportion_difference",
    "t_cdf",
    "t_quantile",
    "welch_difference",
]
