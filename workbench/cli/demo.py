"""The end-to-end tour (``python -m workbench demo``): every DeepSeek-V3 idea of the core, measured once.

1. What the model is: parameters total vs active per token, KV cache bytes per token (MLA vs MHA),
   for the tiny model and for the real DeepSeek-V3 shape.
2. Train the tiny model on the generated multi-domain corpus (auxiliary-loss-free balancing on).
3. What it learned: validation loss per domain; MaxVio of the routing at the start and the end.
4. Whether experts divide the problem: specialisation of expert usage across domains per MoE layer,
   after training against the same model at initialisation.
5. Generation with the latent cache, and speculative decoding with the MTP module (acceptance rate,
   main-model forwards saved, wall time against plain greedy decoding; the tokens must be identical).

Everything printed is also written to ``<out>/report.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from workbench.analysis import expert_usage_by_domain, loss_by_domain, specialisation
from workbench.config import ModelConfig
from workbench.io.files import atomic_write_json
from workbench.model import Model
from workbench.model.accounting import count_params, kv_cache_bytes_per_token
from workbench.model.generate import generate, speculative_generate
from workbench.train import TrainConfig, default_dataset, train


def run_demo(
    out: str | Path = "runs/demo", steps: int = 300, device: str = "auto", progress: bool = True, preset: str = "tiny"
) -> dict:
    out = Path(out)
    report: dict = {}
    config = ModelConfig.from_preset(preset)
    _the_model(report, preset, config)
    model, dataset, usage_init = _training(report, out, preset, config, steps, device, progress)
    _per_domain(report, model, dataset, usage_init)
    _generation(report, model, dataset)
    atomic_write_json(out / "report.json", report)
    print(f"report: {out / 'report.json'}\nmetrics: {out / 'metrics.jsonl'}\ncheckpoint: {out / 'checkpoint'}")
    return report


def _the_model(report: dict, preset: str, config: ModelConfig) -> None:
    print("== 1. The model")
    for name, cfg in ((preset, config), ("deepseek-v3", ModelConfig.from_preset("deepseek-v3"))):
        counts = count_params(cfg)
        kv = kv_cache_bytes_per_token(cfg)
        report[f"params_{name}"] = {k: counts[k] for k in ("total", "active", "mtp")}
        report[f"kv_bytes_per_token_{name}"] = kv
        unit, div = ("B", 1e9) if counts["total"] > 1e9 else ("M", 1e6)
        print(
            f"{name:>12}: {counts['total'] / div:,.2f}{unit} parameters, {counts['active'] / div:,.2f}{unit} active "
            f"per token ({counts['active'] / counts['total']:.1%}); KV cache per token (bf16): MLA {kv['mla']:,} B vs "
            f"MHA {kv['mha']:,} B ({kv['mha'] / kv['mla']:.1f}x smaller)"
        )


def _training(report: dict, out: Path, preset: str, config: ModelConfig, steps: int, device: str, progress: bool):
    print(f"== 2. Training the {preset} model for {steps} steps")
    tc = TrainConfig(steps=steps, device=device, eval_every=max(1, steps // 5))
    dataset = default_dataset(tc)
    torch.manual_seed(tc.seed)
    untrained = Model(config)
    usage_init = expert_usage_by_domain(untrained, dataset)
    t0 = time.perf_counter()
    result = train(config, tc, out, dataset=dataset, progress=progress, model=_copy(untrained), overwrite=True)
    model = result.model
    seconds = time.perf_counter() - t0
    first, last = result.metrics[0], result.metrics[-1]
    report["training"] = {
        "steps": steps,
        "seconds": round(seconds, 1),
        "first_loss": first["main_loss"],
        "final_loss": last["main_loss"],
        "eval_loss": last.get("eval_loss"),
        "max_vio_first_step": first.get("max_vio"),
        "max_vio_last_step": last.get("max_vio"),
    }
    print(
        f"loss {first['main_loss']:.3f} -> {last['main_loss']:.3f} (validation {last.get('eval_loss', 0):.3f}) "
        f"in {seconds:.0f}s; routing MaxVio {first.get('max_vio', 0):.2f} -> {last.get('max_vio', 0):.2f}"
    )
    return model, dataset, usage_init


def _per_domain(report: dict, model: Model, dataset, usage_init: torch.Tensor) -> None:
    print("== 3. Validation loss per domain")
    per_domain = loss_by_domain(model, dataset)
    report["loss_by_domain"] = per_domain
    for d, v in per_domain.items():
        print(f"{d:>12}: {v:.3f}")

    print("== 4. Do experts specialise by domain? (0 = same usage everywhere, 1 = disjoint experts)")
    usage = expert_usage_by_domain(model, dataset)
    spec_init, spec = specialisation(usage_init), specialisation(usage)
    report["specialisation_init"] = spec_init.tolist()
    report["specialisation_trained"] = spec.tolist()
    report["top_expert_by_domain"] = {}
    for layer in range(usage.shape[0]):
        tops = {d: int(usage[layer, i].argmax()) for i, d in enumerate(dataset.domains)}
        report["top_expert_by_domain"][f"moe_layer_{layer}"] = tops
        print(
            f"MoE layer {layer}: specialisation {spec_init[layer]:.2f} at init -> {spec[layer]:.2f} trained; "
            f"favourite expert per domain {tops}"
        )


def _generation(report: dict, model: Model, dataset) -> None:
    print("== 5. Generation with the latent cache, and MTP speculative decoding")
    from workbench.io.tokenizer import tokenizer_of

    tok = tokenizer_of(model)
    generator = torch.Generator().manual_seed(1)
    samples, greedy_s, spec_s, drafted, accepted, forwards, new_tokens = {}, 0.0, 0.0, 0, 0, 0, 0
    for domain in dataset.domains:
        ids, _ = dataset.domain_batch(domain, "val", 1, 16, generator)
        prompt = ids[0].tolist()
        t = time.perf_counter()
        plain = generate(model, prompt, 48)
        greedy_s += time.perf_counter() - t
        res = speculative_generate(model, prompt, 48)
        spec_s += res.seconds
        if not torch.equal(plain.cpu(), res.tokens.cpu()):
            raise AssertionError("speculative decoding changed the greedy output")
        drafted, accepted, forwards = drafted + res.drafted, accepted + res.accepted, forwards + res.main_forwards
        new_tokens += res.tokens.shape[1] - len(prompt)
        samples[domain] = tok.decode(plain[0, len(prompt) :].tolist())
        print(f"--- {domain}: {tok.decode(prompt)!r} ->\n{samples[domain]!r}")
    report["samples"] = samples
    report["speculative"] = {
        "acceptance_rate": accepted / max(1, drafted),
        "tokens_per_main_forward": new_tokens / max(1, forwards),
        "greedy_seconds": round(greedy_s, 3),
        "speculative_seconds": round(spec_s, 3),
        "speedup": greedy_s / max(spec_s, 1e-9),
    }
    sp = report["speculative"]
    print(
        f"MTP drafts accepted {sp['acceptance_rate']:.0%}; {sp['tokens_per_main_forward']:.2f} tokens per main "
        f"forward; wall time {sp['greedy_seconds']:.2f}s greedy vs {sp['speculative_seconds']:.2f}s speculative "
        f"({sp['speedup']:.2f}x); outputs identical"
    )


def _copy(model: Model) -> Model:
    clone = Model(model.config)
    clone.load_state_dict(model.state_dict())
    return clone
