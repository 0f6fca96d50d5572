"""The lesson audit (workbench.analysis.audit) catches what it is for: a printed conclusion its own numbers
do not support, an explanation written for another outcome, a verdict sentence typed by hand, a typed
number in markdown, a ledger label that does not follow from its rule."""

from __future__ import annotations

import copy

from workbench.analysis import audit, claims
from workbench.analysis.stats import VERDICT_KEY, Verdict

EXPLAIN = {"a": "A is better because of x.", "b": "B is better because of y.", "unclear": "maybe x."}


def _nb(*outputs):
    return {"cells": [{"cell_type": "code", "source": "", "outputs": list(outputs)}], "metadata": {}}


def _shown(v: Verdict, **explanations):
    return {
        "output_type": "display_data",
        "data": {"text/markdown": v.markdown(**explanations)},
        "metadata": {VERDICT_KEY: v.record(**explanations)},
    }


def _clear():
    return Verdict.compare(
        "A",
        [1.0, 1.1, 1.2, 1.05],
        "B",
        [0.5, 0.55, 0.6, 0.5],
        paired=True,
        metric="score",
        better="higher",
        knob="seeds",
    )


def _noisy():
    return Verdict.compare(
        "A", [1.0, 0.2, 1.5], "B", [0.9, 0.8, 0.7], paired=True, metric="score", better="higher", knob="seeds"
    )


def test_honest_verdicts_pass():
    for v in (
        _clear(),
        _noisy(),
        Verdict.compare("A", [1.0, 2.0], "B", [0.0, 0.1], paired=True, metric="m", better="lower", knob="seeds"),
    ):
        assert audit.verdict_problems(_nb(_shown(v, **EXPLAIN))) == []
    assert _noisy().outcome == "unclear" and _clear().outcome == "a"


def test_a_conclusion_the_interval_does_not_support_is_caught():
    out = _shown(_noisy(), **EXPLAIN)
    out["metadata"][VERDICT_KEY]["outcome"] = "a"  # a lesson that decided by the point estimate
    problems = audit.verdict_problems(_nb(out))
    assert any("call for 'unclear'" in p for p in problems)


def test_below_the_power_threshold_nothing_concludes():
    rec = _clear().record(**EXPLAIN)
    rec["min_n"] = 10  # four seeds under a threshold of ten
    assert audit.expected_outcome(rec) == "unclear"
    assert any("call for 'unclear'" in p for p in audit.record_problems(rec))


def test_an_explanation_for_another_outcome_is_caught():
    out = _shown(_noisy(), **EXPLAIN)
    text = out["metadata"][VERDICT_KEY]["text"]
    out["data"]["text/markdown"] = text + " " + EXPLAIN["a"]  # the fixed "why" beside a conditional verdict
    out["metadata"][VERDICT_KEY]["explanation"] = EXPLAIN["a"]
    problems = audit.verdict_problems(_nb(out))
    assert any("not the one written" in p for p in problems)
    assert any("displayed text" in p for p in problems)


def test_wrong_order_in_the_sentence_is_caught():
    rec = _clear().record()
    rec["text"] = rec["text"].replace("**A** beats **B**", "**B** beats **A**")
    assert any("should read" in p for p in audit.record_problems(rec))
    lower = copy.deepcopy(_clear())
    rec = Verdict(lower.a, lower.b, lower.diff, "score", "seeds", better="lower").record()
    assert rec["text"].startswith("**B** beats **A**") and audit.record_problems(rec) == []


def test_a_hand_typed_verdict_sentence_is_caught():
    typed = {
        "output_type": "display_data",
        "data": {"text/markdown": "**MTP** beats **no MTP** by 0.02."},
        "metadata": {},
    }
    stream = {"output_type": "stream", "name": "stdout", "text": ["**Cannot tell** who won\n"]}
    assert len(audit.verdict_problems(_nb(typed, stream))) == 2


def test_ledger_labels_are_rederived():
    f = claims.Finding.of("params-571", claims.compare_figure(571e9, 671.03e9), "671.03B counted")
    out = {
        "output_type": "display_data",
        "data": {"text/markdown": f.markdown()},
        "metadata": {claims.CLAIM_KEY: f.record()},
    }
    assert audit.verdict_problems(_nb(out)) == []
    out["metadata"][claims.CLAIM_KEY]["label"] = "holds"
    assert any("its rule gives 'misquoted'" in p for p in audit.verdict_problems(_nb(out)))


def test_typed_numbers_in_prose_and_what_is_not_counted():
    assert audit.typed_numbers("MLA caches 70,272 bytes, about 1.5x less.") == ["70,272", "1.5"]
    clean = (
        "## 3. What is cached\n\n1. DeepSeek-V3 in FP8 (E4M3), top-2 of `n=256`, bf16 on an H800;\n"
        "see lesson 4 and sections 1-4, exercise 2, $x^2$, [link](a_01.ipynb#s-2)."
    )
    assert audit.typed_numbers(clean) == []
    nb = {"cells": [{"cell_type": "markdown", "source": ["fine\n"]}, {"cell_type": "markdown", "source": "0.3x"}]}
    assert audit.typed_number_cells(nb) == {1: ["0.3"]}
