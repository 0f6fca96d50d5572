"""The routing report (workbench.analysis.report) and the ``analyze`` command: the same figures whole and
layer by layer, a self-contained page, and refusals before anything is read or written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.analysis.report import report_html, routing_report, windows
from workbench.cli import main
from workbench.io.hf import load_hf, save_hf
from workbench.io.layered import LayeredModel
from workbench.util import SHIPPED_DATA

TINY = SHIPPED_DATA / "tiny-model"


def _sources(n: int = 2, seed: int = 0) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randint(0, 2048, (5, 24), generator=g).tolist() for i in range(n)}


def test_windows_cut_a_stream_without_padding():
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(list(range(3)), 8) == [[0, 1, 2]]  # a short source is one short window
    assert windows(list(range(100)), 10, max_tokens=25) == [list(range(10)), list(range(10, 20))]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        windows([5], 4)


def test_report_is_the_same_whole_and_layer_by_layer():
    whole = load_hf(TINY)
    layered = LayeredModel(TINY)
    sources = _sources()
    a, b = routing_report(whole, sources, batch_size=3), routing_report(layered, sources, batch_size=3)
    assert a["execution"] == "whole model" and b["execution"] == "layer by layer"
    for x, y in zip(a["layers"], b["layers"]):
        assert x["load"] == y["load"] and x["per_source"] == y["per_source"]
        assert x["shared_share"] == pytest.approx(y["shared_share"], rel=1e-6)
    config = whole.config
    assert [e["layer"] for e in a["layers"]] == list(range(config.first_k_dense_replace, config.num_hidden_layers))
    tokens = sum(len(w) for ws in sources.values() for w in ws)
    for e in a["layers"]:
        assert sum(e["load"]) == tokens * config.num_experts_per_tok
        loads = torch.tensor(e["load"], dtype=torch.float)
        assert e["max_vio"] == pytest.approx(float((loads.max() - loads.mean()) / loads.mean()), abs=1e-6)
        assert 0 < e["shared_share"] < 1
    assert len(a["specialisation"]["per_layer"]) == len(a["layers"])
    assert b["model"]["layers_read"] == 4 * config.num_hidden_layers  # 2 sources x 2 batches (3 + 2 windows)


def test_shared_share_is_zero_without_shared_output_and_one_without_routed_output():
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for block in model.layers:
            if block.is_moe:
                block.mlp.shared_experts.down_proj.weight.zero_()
    report = routing_report(model, _sources(1))
    assert all(e["shared_share"] == 0 for e in report["layers"])
    assert report["specialisation"] is None  # one source: nothing to compare
    with torch.no_grad():
        for block in model.layers:
            if block.is_moe:
                block.mlp.shared_experts.down_proj.weight.normal_()
                block.mlp.experts.down_proj.zero_()
    assert all(e["shared_share"] == 1 for e in routing_report(model, _sources(1))["layers"])


def test_report_reads_a_v2_routed_checkpoint(tmp_path):
    v2 = dict(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
              routed_scaling_factor=16.0, num_nextn_predict_layers=0)  # fmt: skip
    config = ModelConfig.from_preset("tiny", **v2)
    save_hf(Model(config), tmp_path / "v2", max_shard_bytes=200_000)
    report = routing_report(LayeredModel(tmp_path / "v2"), _sources())
    assert report["model"]["topk_method"] == "group_limited_greedy"
    assert report["layers"][0]["mean_gate_weight"] > 1  # softmax weights x 16, not renormalised


def test_page_is_self_contained():
    page = report_html(routing_report(load_hf(TINY), _sources()))
    assert page.startswith("<!DOCTYPE html>") and page.count("Plotly.newPlot") >= 4
    assert "<script src=" not in page and 'src="http' not in page  # plotly.js is inlined, nothing is fetched


# ---- the command ---------------------------------------------------------------------------------------
def test_analyze_command_writes_json_and_html(tmp_path, capsys):
    texts = []
    for name, text in (
        ("story.txt", "Once upon a time a fox met a crow. " * 40),
        ("code.txt", "def f(x):\n    return x\n" * 60),
    ):
        (tmp_path / name).write_text(text, encoding="utf-8")
        texts.append(str(tmp_path / name))
    out = tmp_path / "report"
    args = ["analyze", "--model", str(TINY), "--text", *texts, "--out", str(out), "--seq-len", "64", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["execution"] == "whole model" and summary["tokens"] > 0
    report = json.loads((out / "routing.json").read_text())
    assert set(report["sources"]) == {"story.txt", "code.txt"}
    assert report["specialisation"]["mean"] > 0
    assert (out / "routing.html").stat().st_size > 1_000_000  # plotly.js inside
    assert main([*args, "--layered"]) == 2  # the report is there: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--layered", "--overwrite"]) == 0
    layered = json.loads((out / "routing.json").read_text())
    assert layered["execution"] == "layer by layer"
    assert [e["load"] for e in layered["layers"]] == [e["load"] for e in report["layers"]]


@pytest.mark.parametrize(
    "extra, says",
    [
        ([], "give --corpus"),
        (["--text", "/nowhere/at/all.txt"], "no such file"),
        (["--corpus", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["--corpus", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_analyze_refuses_bad_input_before_writing(tmp_path, capsys, extra, says):
    out = tmp_path / "r"
    assert main(["analyze", "--model", str(TINY), "--out", str(out), *extra]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_analyze_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert main(["analyze", "--model", str(tmp_path), "--corpus", "--out", str(tmp_path / "r")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_analyze_corpus_reports_every_domain(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped model loads without a word
        assert main(["analyze", "--model", str(TINY), "--corpus", "--corpus-docs", "60", "--out", str(tmp_path),
                     "--no-progress", "--max-tokens", "512"]) == 0  # fmt: skip
    report = json.loads((Path(tmp_path) / "routing.json").read_text())
    assert len(report["sources"]) == 5 and report["specialisation"] is not None
