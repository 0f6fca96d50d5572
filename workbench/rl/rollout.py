"""Rollouts: sample completions for many prompts at once, cut them at the answer, score them.

``sample_completions`` samples many prompts in one batch, every prompt repeated ``n`` times (GRPO's G
samples per prompt). Prompts of different lengths share a batch: ``generate`` pads them on the left and the
model's attention mask keeps the pads out (``workbench.model.mla.padded_layout``), so a row samples as it
would alone. Prompts are sorted by length first, so that a batch mixes only lengths that are close and
little compute goes to padding; a batch whose prompts are all one length runs the unmasked path.
Sampling itself is ``workbench.model.generate.generate`` (the latent KV cache, temperature, top-p),
stopped at ``</answer>``.

After sampling, each completion is cut right after its first stop token (``</answer>`` or
``<|eos|>``); what the batch produced after that is padding. Training then *right*-pads
prompt + completion to one length: in a causal model a token never sees later positions, so right
padding changes nothing before it, and a mask removes the padded positions from every loss.

``evaluate`` samples a task's held-out problems and reports the mean accuracy and format rewards, the
mean completion length, and (with several samples per problem) pass@k.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.io.tokenizer import Tokenizer
from workbench.model import Model
from workbench.model.generate import generate
from workbench.tasks import Example, Task
from workbench.tasks.rewards import ANSWER_END


@dataclass
class Rollouts:
    """Sampled completions. Row ``i`` continues ``prompts[prompt_index[i]]``."""

    prompts: list[list[int]]  # token ids of each distinct prompt (with <|bos|>)
    prompt_index: list[int]  # (N,) which prompt each completion continues
    completions: list[list[int]]  # (N,) completion ids, up to and including the stop token
    finished: list[bool]  # (N,) ended with a stop token (False: cut by max_new_tokens)
    texts: list[str] = field(default_factory=list)  # decoded completions (special tokens kept)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completions]


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """``<|bos|>`` + the prompt's ids (documents in the corpus start with ``<|bos|>`` too)."""
    return [tok.bos_id, *tok.encode(text)]


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Generation stops at ``</answer>`` (the end of an R1-format completion) or ``<|eos|>``."""
    return (tok.token_id(ANSWER_END), tok.eos_id)


@torch.no_grad()
def sample_completions(
    model: Model,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    max_new_tokens: int,
    stop: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    max_batch: int = 256,
) -> Rollouts:
    """``n`` completions of every prompt; rows come out prompt by prompt (prompt 0's n, then prompt 1's ...).

    Up to ``max_batch`` rows are sampled together, prompts of any lengths mixed (left-padded, masked)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    prompts = [list(p) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt must hold at least one token (encode_prompt adds <|bos|>)")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: equal lengths keep their order
    per_prompt: dict[int, list[tuple[list[int], bool]]] = {}
    stop_set = set(stop)
    per_batch = max(1, max_batch // n)  # prompts per generate() call
    for c in range(0, len(order), per_batch):
        chunk = order[c : c + per_batch]
        rows = [prompts[i] for i in chunk for _ in range(n)]  # (b*n) prompts, left-padded by generate
        out = generate(
            model,
            rows,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=stop[0],
            generator=generator,
        )
        width = max(len(r) for r in rows)
        new = out[:, width:].tolist()  # (b*n, <= max_new_tokens)
        for j, i in enumerate(chunk):
            per_prompt[i] = [_cut(new[j * n + k], stop_set) for k in range(n)]
    prompt_index, completions, finished = [], [], []
    for i in range(len(prompts)):
        for ids, done in per_prompt[i]:
            prompt_index.append(i)
            completions.append(ids)
            finished.append(done)
    return Rollouts(prompts=prompts, prompt_index=prompt_index, completions=completions, finished=finished)


def _cut(ids: list[int], stop: set[int]) -> tuple[list[int], bool]:
    for t, token in enumerate(ids):
        if token in stop:
            return ids[: t + 1], True
    return ids, False


def decode_completion(tok: Tokenizer, ids: Sequence[int]) -> str:
    """The completion's text for the reward: ``<|bos|>``/``<|eos|>``/``<|pad|>`` dropped, tags kept."""
    return tok.decode(list(ids), skip_special=True)


def pad_sequences(
    rollouts: Rollouts, pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion of every row, right-padded: ``ids`` (N, T) and ``mask`` (N, T-1).

    ``mask[i, t]`` is 1 where token ``t + 1`` of row ``i`` is a completion token, i.e. where the logits
    at position ``t`` are scored (the model predicts position t + 1 from position t).
    """
    rows = [rollouts.prompts[p] + c for p, c in zip(rollouts.prompt_index, rollouts.completions)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1)
    for i, (row, p, c) in enumerate(zip(rows, rollouts.prompt_index, rollouts.completions)):
        ids[i, : len(row)] = torch.tensor(row)
        start = len(rollouts.prompts[p])  # first completion token
        mask[i, start - 1 : start - 1 + len(c)] = 1.0
    return ids.to(device), mask.to(device)


def score(task: Task, examples: Sequence[Example], rollouts: Rollouts, tok: Tokenizer) -> list[dict[str, float]]:
    """Decode every completion (kept in ``rollouts.texts``) and compute the task's rewards."""
    rollouts.texts = [decode_completion(tok, c) for c in rollouts.completions]
    return [task.reward(text, examples[p]) for text, p in zip(rollouts.texts, rollouts.prompt_index)]


@torch.no_grad()
def sample_and_score(
    model: Model,
    task: Task,
    examples: Sequence[Example],
    tok: Tokenizer,
    n_samples: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> tuple[Rollouts, list[dict[str, float]]]:
    """``n_samples`` completions of every problem's prompt (a fresh generator seeded with ``seed``), and
    the task's rewards of each: what evaluation and rejection sampling both start from."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    prompts = [encode_prompt(tok, task.prompt(ex)) for ex in examples]
    ro = sample_completions(
        model,
        prompts,
        n_samples,
        max_new_tokens=max_new_tokens,
        stop=stop_ids(tok),
        temperature=temperature,
        top_p=top_p,
        generator=gen,
    )
    return ro, score(task, examples, ro, tok)


@torch.no_grad()
def evaluate(
    model: Model,
    task: Task,
    examples: Sequence[Example],
    tok: Tokenizer,
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    return_samples: bool = False,
) -> dict[str, Any]:
    """Held-out accuracy: mean accuracy and format over ``n_samples`` completions per problem.

    ``temperature=0`` is greedy (then one sample is enough). ``pass_at_k`` is the fraction of problems
    with at least one correct sample among the ``n_samples``. With ``return_samples`` the result also
    holds ``samples``: (question, completion, accuracy, format) for every completion, to read.
    """
    if temperature == 0:
        n_samples = 1
    ro, rewards = sample_and_score(
        model,
        task,
        examples,
        tok,
        n_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    acc = [r["accuracy"] for r in rewards]
    fmt = [r["format"] for r in rewards]
    solved = defaultdict(float)
    for r, p in zip(rewards, ro.prompt_index):
        solved[p] = max(solved[p], r["accuracy"])
    result: dict[str, Any] = {
        "accuracy": sum(acc) / len(acc),
        "format": sum(fmt) / len(fmt),
        "length": sum(ro.lengths) / len(ro),
        f"pass_at_{n_samples}": sum(solved.values()) / len(examples),
        "n_problems": len(examples),
        "n_samples": n_samples,
        "temperature": temperature,
    }
    if return_samples:
        result["samples"] = [
            (examples[p].question, text, r["accuracy"], r["format"])
            for p, text, r in zip(ro.prompt_index, ro.texts, rewards)
        ]
    return result


def held_out_evaluator(
    task: Task,
    tok: Tokenizer,
    n_problems: int,
    *,
    seed: int = 0,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 64,
) -> Callable[[Model], dict[str, Any]]:
    """``ev(model)``: ``evaluate`` on the same ``n_problems`` test-split problems (drawn with ``seed``)
    with the same sampling (seeded with ``seed``) every time, so that the stages of a run compare."""
    examples = task.sample(n_problems, seed=seed, split="test")

    def ev(model: Model) -> dict[str, Any]:
        return evaluate(
            model,
            task,
            examples,
            tok,
            n_samples=n_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )

    return ev
