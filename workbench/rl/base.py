"""The base model for R1-Zero: pre-training on a corpus where reasoning appears only sometimes.

DeepSeek-R1-Zero started from DeepSeek-V3-Base, a model pre-trained on 14.8T tokens that already
contained worked solutions. Reinforcement learning did not invent reasoning from nothing: it made
the model use, lengthen and repair reasoning it could already produce now and then. RL with a
rule-based reward also needs a non-zero success rate to begin with: if no sample in a group is ever
right, every advantage is zero and nothing is learnt.

Our stand-in for "the internet" is a task corpus (``base_documents``) of solved training-split
problems, each written in one of two styles:

* with reasoning (a fraction ``think_fraction``): ``prompt <think>steps</think><answer>a</answer>``;
* direct: ``prompt <answer>a</answer>``, no reasoning, hence no format reward.

``pretrain_base`` trains a model on it with the ordinary pre-training loop (``workbench.train``):
next-token loss on every token, windows that cross document boundaries. Such a base answers in both
styles, in about the corpus's proportions; answering directly is harder than working column by column,
so RL that rewards accuracy and format learns to think first, and its response length grows, as
R1-Zero's did. Held-out problems never appear in the corpus.

Where it simplifies: DeepSeek's base saw reasoning in an ocean of other text, and its R1-Zero template
asked for the tags in words. Here the only text is the task, and the tags come from the corpus. The
base is small and briefly trained, so its answers are often wrong even when it reasons: RL has
something to improve on both counts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from workbench.config import ModelConfig
from workbench.data import Document, TokenDataset
from workbench.io.tokenizer import Tokenizer, load_tokenizer
from workbench.tasks import Task
from workbench.train import TrainConfig, TrainResult, train


def rl_model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """The model for the R1 lessons: a preset without the MTP module (RL never uses it), as a config."""
    values = {"num_nextn_predict_layers": 0}
    values.update(overrides)
    return ModelConfig.from_preset(preset, **values)


def base_documents(task: Task, n_docs: int, seed: int = 0, think_fraction: float = 0.3) -> list[Document]:
    """``n_docs`` solved training problems as text, a ``think_fraction`` of them with reasoning."""
    if not 0.0 <= think_fraction <= 1.0:
        raise ValueError(f"think_fraction must be in [0, 1], got {think_fraction}")
    rng = random.Random(f"base/{task.name}/{seed}")
    docs = []
    for ex in task.sample(n_docs, seed=seed, split="train"):
        style = "think" if rng.random() < think_fraction else "direct"
        completion = task.trace(ex) if style == "think" else task.direct(ex)
        docs.append(Document(domain=style, text=task.prompt(ex) + completion))
    return docs


def base_train_config(steps: int = 300, *, seed: int = 0, device: str = "auto") -> TrainConfig:
    """The base's pre-training recipe, in one place: ``steps`` of 32 windows of 64 tokens at lr 3e-3, with
    a warmup of min(30, steps / 10), no evaluation."""
    warmup = min(30, steps // 10)
    return TrainConfig(steps=steps, batch_size=32, seq_len=64, lr=3e-3, warmup_steps=warmup, eval_every=0, seed=seed,
                       device=device)  # fmt: skip


def pretrain_base(
    task: Task,
    model_config: ModelConfig | None = None,
    tc: TrainConfig | None = None,
    *,
    n_docs: int = 4000,
    think_fraction: float = 0.3,
    extra: Sequence[Document] = (),
    tokenizer: Tokenizer | None = None,
    out_dir=None,
    progress: bool = True,
) -> TrainResult:
    """Pre-train a base model on ``base_documents`` with ``workbench.train.train``; returns its result.

    extra: more documents mixed into the corpus (``base_documents`` of another task: the reading drills of
    ``recall`` for a base that must read). Defaults: the ``tiny`` preset without MTP, 300 steps of 32
    windows of 64 tokens.
    """
    tok = tokenizer or load_tokenizer()
    model_config = model_config or rl_model_config()
    tc = tc or base_train_config()
    tc = replace(tc)  # never mutate the caller's config
    docs = base_documents(task, n_docs, seed=tc.data_seed, think_fraction=think_fraction) + list(extra)
    dataset = TokenDataset.from_documents(docs, tok, val_fraction=0.1, seed=tc.data_seed)
    return train(model_config, tc, out_dir, dataset=dataset, progress=progress)


__all__ = ["base_documents", "base_train_config", "pretrain_base", "rl_model_config"]
