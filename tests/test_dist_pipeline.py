"""The pipeline simulator against DualPipe's bubble formulas, the closed-form traffic, and chunk timing."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import ModelConfig
from workbench.dist.comm import expected_traffic, v3_cluster_figures
from workbench.dist.pipeline import ChunkTimes, bubble_formula, chunk_times, schedule, simulate
from workbench.dist.timing import measure_chunk_times

times = st.floats(0.1, 5.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(F=times, ratio=st.floats(1.0, 3.0), share=st.floats(0.0, 1.0), stages=st.sampled_from([2, 3, 4, 8]),
       extra=st.integers(0, 12))  # fmt: skip
def test_1f1b_and_zero_bubble_idle_exactly_what_the_formulas_say(F, ratio, share, stages, extra):
    """ZB1P's formula holds where W fits the gaps it fills: W <= F and W <= B - W (the zero-bubble paper's
    setting), with a backward one to three forwards long; 1F1B's holds for any times."""
    B = F * ratio
    t = ChunkTimes(F=F, B=B, W=min(B * share, F, B / 2))
    for name in ("1f1b", "zb1p"):
        timeline = simulate(name, stages, stages + extra, t)
        assert timeline.bubble == pytest.approx(bubble_formula(name, stages, t), rel=1e-9, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(F=times, overlap=st.floats(0.0, 1.0), stages=st.sampled_from([2, 4, 6, 8]), extra=st.integers(0, 6))
def test_dualpipe_idles_what_its_formula_says_when_f_b_and_w_are_equal(F, overlap, stages, extra):
    """The formula counts chunks of equal F, B-for-inputs and W; F&B anywhere from max(F, B) to F + B."""
    B = 2 * F
    t = ChunkTimes(F=F, B=B, W=F, FB=B + overlap * F)
    timeline = simulate("dualpipe", stages, 2 * stages + 2 * extra, t)
    assert timeline.bubble == pytest.approx(bubble_formula("dualpipe", stages, t), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe"])
def test_every_chunk_runs_once_and_after_its_inputs(name):
    stages, m = 4, 12
    t = ChunkTimes(F=1.0, B=2.2, W=0.9)
    timeline = simulate(name, stages, m, t)
    seen = Counter()
    for row in timeline.slots:
        for chunk, start, end in row:
            assert end - start == pytest.approx(t.of(chunk))
            if chunk.kind == "FB":
                seen[("F", chunk.mb, chunk.direction)] += 1
                seen[("B", chunk.mb2, chunk.direction2)] += 1
            else:
                seen[("B" if chunk.kind in ("B", "Bi") else chunk.kind, chunk.mb, chunk.direction)] += 1
        starts = [s for _, s, _ in row]
        assert starts == sorted(starts)  # a rank runs one chunk at a time
    directions = 2 if name == "dualpipe" else 1
    per_direction = m // directions
    for d in range(directions):
        for mb in range(per_direction):
            assert seen[("F", mb, d)] == stages and seen[("B", mb, d)] == stages
    assert timeline.makespan >= max(sum(e - s for _, s, e in row) for row in timeline.slots)


def test_zero_bubble_beats_1f1b_and_dualpipe_beats_both_on_these_times():
    t = ChunkTimes(F=1.0, B=2.0, W=1.0)
    bubbles = {name: simulate(name, 8, 32, t).bubble for name in ("1f1b", "zb1p", "dualpipe")}
    assert bubbles["dualpipe"] < bubbles["zb1p"] < bubbles["1f1b"]


def test_hiding_communication_behind_the_other_chunk_shortens_the_run():
    exposed = chunk_times(1.0, 2.0, 1.0, comm_f=0.8, comm_b=0.8)
    hidden = chunk_times(1.0, 2.0, 1.0, comm_f=0.8, comm_b=0.8, overlap=True)
    assert simulate("dualpipe", 4, 16, hidden).makespan < simulate("dualpipe", 4, 16, exposed).makespan


def test_bad_schedules_and_times_are_refused():
    with pytest.raises(ValueError, match="even number of stages"):
        schedule("dualpipe", 3, 12)
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule("gpipe", 4, 8)
    with pytest.raises(ValueError, match="part of B"):
        ChunkTimes(F=1.0, B=1.0, W=2.0)
    with pytest.raises(ValueError, match="at least"):
        ChunkTimes(F=1.0, B=2.0, W=1.0, FB=1.5)


# ---- closed-form traffic ------------------------------------------------------------------------------
def test_closed_form_traffic_in_the_cases_that_are_obvious():
    one = expected_traffic(16, 4, ranks=1)
    assert one["copies_to_self"] == 1.0 and one["copies_inter_node"] == 0.0
    spread = expected_traffic(16, 4, ranks=16)  # one expert per rank: exactly k ranks visited
    assert spread["copies_to_self"] + spread["copies_inter_node"] == pytest.approx(4.0)
    limited = expected_traffic(16, 4, ranks=4, ranks_per_node=2, max_nodes=1)
    assert limited["nodes_per_token"] == pytest.approx(1.0)
    assert limited["node_hops"] == pytest.approx(0.5)  # the one node is the token's own half the time
    with pytest.raises(ValueError, match="max_nodes"):
        expected_traffic(16, 4, ranks=4, max_nodes=5)


def test_the_v3_node_limit_bounds_the_infiniband_traffic():
    limited, free = v3_cluster_figures(max_nodes=4), v3_cluster_figures(max_nodes=None)
    assert limited["ranks"] == 64 and limited["experts_per_gpu"] == 4
    assert limited["nodes_per_token"] <= 4 < free["nodes_per_token"]
    assert limited["ib_bytes_per_token"] < free["ib_bytes_per_token"]
    assert limited["ib_copies_per_token"] <= 4


def test_chunk_times_of_our_blocks_are_measured():
    t = measure_chunk_times(ModelConfig.from_preset("tiny"), batch=2, seq_len=16, repeats=2)
    assert t["F"] > 0 and t["B"] > 0 and 0 <= t["W"] <= t["B"] and t["B_input"] <= t["B"]
    ChunkTimes(F=t["F"], B=t["B"], W=t["W"])  # usable by the simulator as they are
    assert {k: len(v) for k, v in t["repeats"].items()} == {"F": 2, "B": 2, "B_input": 2}  # the warm-up is dropped
    assert sorted(t["repeats"]["F"])[0] <= t["F"] <= sorted(t["repeats"]["F"])[-1]
