"""The claims ledger: what popular accounts of DeepSeek say, what DeepSeek reported, and a computed verdict.

Popular accounts of DeepSeek-V3 and R1 (press articles, explainers, posts) repeat a handful of
sentences. The course tests each one with an experiment, or with arithmetic on the real configuration,
and records the result as a ``Finding`` with one of four labels:

* ``holds``: the experiment (or the arithmetic) supports the sentence;
* ``does not hold``: it measures the opposite, or an effect the sentence denies;
* ``cannot tell at this scale``: the budget's noise is larger than the effect (see ``stats.Verdict``);
* ``misquoted``: the sentence misstates a figure DeepSeek published or the configuration fixes.

A label is never typed: ``judge(verdict, holds=..., fails=...)`` maps a verdict's outcome to it, and
``compare_figure(claimed, actual, rel_tol)`` calls a quoted number misquoted when it is further than
``rel_tol`` from the real one. ``Finding.show()`` displays the row in the lesson that measures it,
with the numbers and the rule in the output's metadata (``workbench_claim``); the ledger lesson
(``12_claims_ledger``) collects every finding from the executed lessons (``collect_findings``) and
``tests/test_notebooks.py`` re-derives each label from its rule.

``REPORTED`` holds DeepSeek's published figures the lessons compare against, each with its source, so
that no lesson types a reference number into its prose.

To add a claim: append a ``Claim`` to ``CLAIMS`` (its ``lesson`` and ``section`` name the heading that
measures it), then in that lesson build a ``Finding`` from a verdict or a figure and ``show()`` it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.analysis.stats import Verdict

CLAIM_KEY = "workbench_claim"  # the output metadata key of a finding
LABELS = ("holds", "does not hold", "cannot tell at this scale", "misquoted")


@dataclass(frozen=True)
class Reported:
    """A figure DeepSeek published, with where."""

    value: float
    unit: str
    source: str


_V3_PRICING = "DeepSeek API pricing page, deepseek-chat (V3) from 2025-02-08"
REPORTED: dict[str, Reported] = {
    "total_params": Reported(671e9, "parameters", "DeepSeek-V3 technical report, abstract"),
    "active_params": Reported(37e9, "parameters per token", "DeepSeek-V3 technical report, abstract"),
    "mtp_params": Reported(14e9, "parameters (with its copies of embedding and head)", "DeepSeek-V3 report, §4.2"),
    "train_tokens": Reported(14.8e12, "tokens", "DeepSeek-V3 report, abstract"),
    "pretrain_context": Reported(4096, "tokens", "DeepSeek-V3 report, §4.2"),
    "batch_sequences": Reported(15360, "sequences per batch (after the batch-size warmup)", "DeepSeek-V3 report, §4.2"),
    "hours_pretrain": Reported(2664e3, "H800 GPU hours", "DeepSeek-V3 report, Table 1"),
    "hours_context": Reported(119e3, "H800 GPU hours", "DeepSeek-V3 report, Table 1"),
    "hours_post": Reported(5e3, "H800 GPU hours", "DeepSeek-V3 report, Table 1"),
    "hours_total": Reported(2788e3, "H800 GPU hours", "DeepSeek-V3 report, Table 1"),
    "price_per_hour": Reported(2.0, "$ per H800 GPU hour (assumed rental)", "DeepSeek-V3 report, Table 1"),
    "cost_total": Reported(5.576e6, "$", "DeepSeek-V3 report, Table 1"),
    "cluster_gpus": Reported(2048, "H800 GPUs", "DeepSeek-V3 report, §3.1"),
    "h800_bf16_tflops": Reported(989.0, "dense BF16 TFLOP/s (an H100's compute)", "NVIDIA H100 SXM datasheet"),
    "h800_fp8_tflops": Reported(1979.0, "dense FP8 TFLOP/s", "NVIDIA H100 SXM datasheet"),
    "mtp_acceptance_low": Reported(0.85, "share of second tokens accepted", "DeepSeek-V3 report, §5.4.3"),
    "mtp_acceptance_high": Reported(0.90, "share of second tokens accepted", "DeepSeek-V3 report, §5.4.3"),
    "mtp_speedup": Reported(1.8, "x tokens per second", "DeepSeek-V3 report, §5.4.3"),
    "fp8_loss_gap": Reported(0.0025, "relative loss error of FP8 against BF16", "DeepSeek-V3 report, §3.3"),
    "acc_bits": Reported(14, "mantissa bits kept by the H800 FP8 accumulator", "DeepSeek-V3 report, §3.3.2"),
    "acc_error_k4096": Reported(0.02, "max relative error, K = 4096, no promotion", "DeepSeek-V3 report, §3.3.2"),
    "acc_k": Reported(4096, "inner dimension K of that accumulation test", "DeepSeek-V3 report, §3.3.2"),
    "promote_every": Reported(128, "products per promotion (N_C)", "DeepSeek-V3 report, §3.3.2"),
    "bias_update_speed": Reported(0.001, "gamma for the first 14.3T tokens", "DeepSeek-V3 report, §4.2"),
    "seq_balance_alpha": Reported(1e-4, "weight of the sequence-wise balance loss", "DeepSeek-V3 report, §4.2"),
    "mtp_weight": Reported(0.3, "lambda for the first 10T tokens (0.1 after)", "DeepSeek-V3 report, §4.2"),
    "comm_sms": Reported(20, "SMs running communication", "DeepSeek-V3 report, §3.2.2"),
    "h800_sms": Reported(132, "SMs of an H800", "DeepSeek-V3 report, §3.2.2"),
    "cache_hit_price": Reported(
        0.014, "$ per million input tokens, cache hit", "DeepSeek API pricing at launch (promotional, to 2025-02-08)"
    ),
    "cache_miss_price": Reported(
        0.14, "$ per million input tokens, cache miss", "DeepSeek API pricing at launch (promotional, to 2025-02-08)"
    ),
    "v3_cache_hit_price": Reported(0.07, "$ per million input tokens, cache hit (deepseek-chat)", _V3_PRICING),
    "v3_cache_miss_price": Reported(0.27, "$ per million input tokens, cache miss (deepseek-chat)", _V3_PRICING),
    "v3_output_price": Reported(1.10, "$ per million output tokens (deepseek-chat)", _V3_PRICING),
    "distill_samples": Reported(800e3, "SFT samples generated by R1", "DeepSeek-R1 report, §2.4"),
    "distill_smallest": Reported(1.5e9, "parameters, smallest distilled model (Qwen)", "DeepSeek-R1 report, §2.4"),
    "distill_largest": Reported(70e9, "parameters, largest distilled model (Llama)", "DeepSeek-R1 report, §2.4"),
    "v2_gqa_groups": Reported(2.25, "GQA groups MLA's cache equals", "DeepSeek-V2 report, Table 1"),
}


@dataclass(frozen=True)
class Claim:
    """One sentence of the popular accounts, and where the course tests it."""

    id: str
    text: str  # the sentence, as the accounts put it
    lesson: str  # the notebook that tests it, e.g. "03_expert_routing.ipynb"
    section: str  # the heading of the section that measures it
    test: str  # what the experiment does, in a line
    also: str = ""  # another lesson that measures more of it (lessons 9-11), by name


CLAIMS: list[Claim] = [
    Claim(
        "moe-silos",
        "A mixture of experts divides the problem vertically into silos",
        "03_expert_routing.ipynb",
        "Do the domains have experts of their own?",
        "specialisation of the trained router against random routers, and each domain's favourite expert knocked out",
    ),
    Claim(
        "update-horizontal",
        "Limiting the part of the network that is updated divides the problem horizontally",
        "01_tour.ipynb",
        "1. What is active per token, and what a step updates",
        "the share of parameters one training step changes, against the share one token uses",
        also="09_add_a_vertical.ipynb (only new experts train)",
    ),
    Claim(
        "phrases-smaller",
        "Predicting phrases instead of tokens reduces the network numerically",
        "04_multi_token_prediction.ipynb",
        "What MTP costs",
        "parameters and training FLOPs with and without the MTP module",
    ),
    Claim(
        "int8-outputs",
        "Eight-bit weights reduce memory without affecting the outputs",
        "06_fp8.ipynb",
        "6. Serving with eight-bit weights",
        "memory against BF16, greedy text, arithmetic accuracy and next-token agreement of 8-bit weights",
    ),
    Claim(
        "fp8-rounding",
        "FP8 is like rounding $10.857643 to $10.86",
        "06_fp8.ipynb",
        "1. Two eight-bit formats",
        "the price cast to E4M3, E5M2 and BF16",
    ),
    Claim(
        "mla-jpeg",
        "MLA compresses the cache like JPEG, or like meeting minutes",
        "02_mla_kv_cache.ipynb",
        "4. A trained-in bottleneck or a compressed cache?",
        "a model trained with a small latent against a full-rank model's cache compressed after training",
    ),
    Claim(
        "experts-256-1-8",
        "256 specialists, 1 generalist, 8 per task",
        "03_expert_routing.ipynb",
        "How many experts does one domain use?",
        "the configuration, and the number of experts one domain's tokens spread over",
    ),
    Claim(
        "params-571",
        "37 billion out of 571 billion",
        "05_economics.ipynb",
        "5. The economics: parameters, FLOPs and a training bill",
        "parameters counted on the meta device",
    ),
    Claim(
        "cost-5.6m",
        "$5.6M = 2,788 thousand H800 hours at $2",
        "05_economics.ipynb",
        "Hours, utilisation and cost",
        "the report's hours times its price, and what the figure leaves out",
    ),
    Claim(
        "aux-free-95",
        "Auxiliary-loss-free balancing led to a 95 per cent decrease in GPU usage",
        "03_expert_routing.ipynb",
        "Two runs: with and without loss-free balancing",
        "MaxVio and FLOPs per token with and without the balancing bias",
    ),
    Claim(
        "r1zero-autonomous",
        "R1-Zero developed reasoning autonomously, with aha moments",
        "07_r1_reward_curves.ipynb",
        "A control: a base that never saw reasoning",
        "GRPO from a base whose corpus never shows reasoning, and a search for aha moments",
    ),
    Claim(
        "distill-teaching",
        "Distillation: AI teaching AI",
        "08_distillation.ipynb",
        "Three students, one budget",
        "a student trained on the teacher's traces against its own base and against RL of its own",
    ),
    Claim(
        "caching",
        "Caching makes a repeated prompt a tenth of the price",
        "10_serving.ipynb",
        "5. What a cache hit is worth",
        "DeepSeek's published prices for a cache hit and a miss, and a prefix hit's time to first token measured",
    ),
    Claim(
        "sms-20-132",
        "20 of 132 SMs reserved for communication",
        "12_claims_ledger.ipynb",
        "Rows measured elsewhere",
        "the share of an H800 the report gives to communication",
        also="11 (communication measured)",
    ),
    Claim(
        "mtp-two-words",
        "It predicts two words at once",
        "04_multi_token_prediction.ipynb",
        "Speculative decoding with the MTP head",
        "tokens per word, and tokens per main-model pass when MTP drafts",
    ),
]
CLAIM_IDS = {c.id: c for c in CLAIMS}


def claim(claim_id: str) -> Claim:
    if claim_id not in CLAIM_IDS:
        raise ValueError(f"unknown claim {claim_id!r}; the ledger's claims are {sorted(CLAIM_IDS)}")
    return CLAIM_IDS[claim_id]


def anchor(heading: str) -> str:
    """The anchor Jupyter Book (MyST) gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def link(claim_id: str, text: str | None = None) -> str:
    """A Markdown link to the section that tests a claim (works in JupyterLab and in the book)."""
    c = claim(claim_id)
    return f"[{text or c.section}]({c.lesson}#{anchor(c.section)})"


def escape_dollars(text: str) -> str:
    """Markdown with its dollar signs kept as money: JupyterLab and the book read ``$...$`` as math."""
    return re.sub(r"(?<!\\)\$", r"\\$", text)


# Labels from rules ---------------------------------------------------------------------------------
def judge(
    verdict: Verdict, *, holds: Iterable[str] = (), fails: Iterable[str] = (), misquoted: Iterable[str] = ()
) -> tuple[str, dict[str, Any]]:
    """The label a verdict's outcome earns: in ``holds`` -> holds, in ``fails`` -> does not hold, in
    ``misquoted`` -> misquoted (the measurement contradicts the figure the sentence quotes), else cannot tell."""
    holds, fails, misquoted = tuple(holds), tuple(fails), tuple(misquoted)
    overlap = (set(holds) & set(fails)) | (set(holds) & set(misquoted)) | (set(fails) & set(misquoted))
    if overlap:
        raise ValueError(f"an outcome cannot earn two labels: {overlap}")
    bad = [o for o in (*holds, *fails, *misquoted) if o not in ("a", "b", "same", "unclear")]
    if bad:
        raise ValueError(f"outcomes are 'a', 'b', 'same' or 'unclear', got {bad}")
    rule = {
        "kind": "verdict",
        "holds": list(holds),
        "fails": list(fails),
        "misquoted": list(misquoted),
        "outcome": verdict.outcome,
    }
    return expected_label(rule), rule


def compare_figure(claimed: float, actual: float, rel_tol: float = 0.02) -> tuple[str, dict[str, Any]]:
    """A quoted number against the real one: misquoted beyond ``rel_tol`` (relative), else it holds."""
    if not (math.isfinite(claimed) and math.isfinite(actual)) or actual == 0:
        raise ValueError(f"need finite figures and a nonzero actual one, got {claimed} and {actual}")
    if not 0 <= rel_tol < 1:
        raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
    off = abs(claimed - actual) / abs(actual)
    label = "misquoted" if off > rel_tol else "holds"
    return label, {"kind": "figure", "claimed": claimed, "actual": actual, "rel_tol": rel_tol, "off": off}


def threshold(value: float, limit: float, holds_if: str) -> tuple[str, dict[str, Any]]:
    """A measured value against the limit the claim implies: it holds when the value is ``below`` (or
    ``above``) the limit, and does not hold otherwise. For exact measurements (counts, FLOPs, casts)."""
    if holds_if not in ("below", "above"):
        raise ValueError(f"holds_if must be 'below' or 'above', got {holds_if!r}")
    if not (math.isfinite(value) and math.isfinite(limit)):
        raise ValueError(f"need finite numbers, got {value} and {limit}")
    ok = value < limit if holds_if == "below" else value > limit
    return ("holds" if ok else "does not hold"), {
        "kind": "threshold",
        "value": value,
        "limit": limit,
        "holds_if": holds_if,
    }


def expected_label(rule: dict[str, Any]) -> str:
    """Re-derive a label from its rule (what the notebook test runs on every finding)."""
    if rule["kind"] == "verdict":
        o = rule["outcome"]
        if o in rule["holds"]:
            return "holds"
        if o in rule["fails"]:
            return "does not hold"
        return "misquoted" if o in rule.get("misquoted", ()) else "cannot tell at this scale"
    if rule["kind"] == "figure":
        off = abs(rule["claimed"] - rule["actual"]) / abs(rule["actual"])
        return "misquoted" if off > rule["rel_tol"] else "holds"
    if rule["kind"] == "threshold":
        ok = rule["value"] < rule["limit"] if rule["holds_if"] == "below" else rule["value"] > rule["limit"]
        return "holds" if ok else "does not hold"
    if rule["kind"] == "all":  # several rules: the first that does not hold decides, else the weakest
        labels = [expected_label(r) for r in rule["rules"]]
        for worst in ("misquoted", "does not hold", "cannot tell at this scale"):
            if worst in labels:
                return worst
        return "holds"
    raise ValueError(f"unknown rule kind {rule['kind']!r}")


def combine(*labelled: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Several tests of one claim: misquoted or does-not-hold wins over cannot-tell, which wins over holds."""
    rule = {"kind": "all", "rules": [r for _, r in labelled]}
    return expected_label(rule), rule


@dataclass
class Finding:
    """One row of the ledger: a claim, its computed label, the number behind it, and the rule."""

    claim: str
    label: str
    number: str  # the measured or computed figure, in words
    rule: dict[str, Any]
    note: str = ""  # one sentence of context (chosen by the same rule when it depends on it)
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # Verdict.record()s behind it

    def __post_init__(self) -> None:
        claim(self.claim)
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if expected_label(self.rule) != self.label:
            raise ValueError(f"label {self.label!r} does not follow from its rule ({expected_label(self.rule)!r})")

    @classmethod
    def of(
        cls,
        claim_id: str,
        labelled: tuple[str, dict[str, Any]],
        number: str,
        note: str = "",
        verdicts: Iterable[Verdict] = (),
    ) -> Finding:
        label, rule = labelled
        return cls(claim_id, label, number, rule, note, [v.record() for v in verdicts])

    def markdown(self) -> str:
        c = claim(self.claim)
        text = f"**Ledger**, *“{c.text}”*: **{self.label}**. {self.number}" + (f" {self.note}" if self.note else "")
        return escape_dollars(text)

    def record(self) -> dict[str, Any]:
        c = claim(self.claim)
        return {**asdict(self), "text": c.text, "lesson": c.lesson, "section": c.section}

    def show(self) -> None:
        from IPython.display import Markdown, display

        display(Markdown(self.markdown()), metadata={CLAIM_KEY: self.record()})


# The ledger ----------------------------------------------------------------------------------------
def _outputs(path: Path) -> Iterable[dict[str, Any]]:
    nb = json.loads(path.read_text())
    for cell in nb.get("cells", []):
        yield from cell.get("outputs", []) if cell.get("cell_type") == "code" else ()


def collect_findings(executed: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every finding shown in the executed lessons under ``executed`` (one folder of .ipynb), by claim id."""
    folder = Path(executed)
    if not folder.is_dir():
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        for out in _outputs(path):
            rec = out.get("metadata", {}).get(CLAIM_KEY)
            if rec:
                found.setdefault(rec["claim"], []).append({**rec, "executed": path.name})
    return found


__all__ = [
    "CLAIMS",
    "CLAIM_IDS",
    "CLAIM_KEY",
    "LABELS",
    "REPORTED",
    "Claim",
    "Finding",
    "Reported",
    "anchor",
    "claim",
    "collect_findings",
    "combine",
    "compare_figure",
    "escape_dollars",
    "expected_label",
    "judge",
    "link",
    "threshold",
]
