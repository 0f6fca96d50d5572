"""Prompt sets: a small declarative file that exposes a vertical through named prompt templates.

A team that has taught a model a new speciality (``workbench.vertical``) wants to hand it to people as a
few ready questions, not as Python. A prompt set is a YAML or JSON file:

.. code-block:: yaml

    name: roman                      # what the set is for
    description: Roman numerals, reasoned place by place
    model: ../vertical-roman         # optional: the model folder, relative to this file
    task: roman                      # optional: check answers with this task's parser
    defaults:                        # optional: generation settings (the command line overrides them)
      max_new_tokens: 64
      temperature: 0.0
    prompts:
      - name: to_roman
        template: "Write {n:digits} in Roman numerals."
        inputs:                      # one run per input; "expect" (optional) is the right answer
          - {n: 347, expect: CCCXLVII}
          - {n: 58}

A template is a Python format string over the input's fields, with one extra format: ``{n:digits}``
writes an integer digit by digit (``3 4 7``), the way the tasks write numbers. ``python -m workbench
ask --prompts FILE`` runs every prompt (or those named with ``--name``), and prints, per input, the
prompt, the model's thinking (inside ``<think>``) and its answer (inside ``<answer>``), and, where an
``expect`` is given and the set names a task, whether the answer is right (both are read by the task's
parser, so ``C C C X L V I I`` and ``CCCXLVII`` are the same answer).

Every mistake in a file is reported with the prompt and field it concerns, before anything runs.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.tasks import chat_prompt, get_task, spell, task_names
from workbench.tasks.rewards import extract_answer, extract_think

GENERATION_KEYS = {"max_new_tokens": int, "temperature": float, "top_p": float, "seed": int}
_TOP_KEYS = {"name", "description", "model", "task", "defaults", "prompts"}
_PROMPT_KEYS = {"name", "template", "inputs", "description"}


class PromptSetError(ValueError):
    """A prompt set file that cannot be used; the message says where and how to fix it."""


class _Formatter(string.Formatter):
    """``str.format`` plus ``{field:digits}`` (an integer digit by digit)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec == "digits":
            try:
                return spell(int(value))
            except (TypeError, ValueError):
                raise PromptSetError(f"{{...:digits}} needs an integer, got {value!r}") from None
        return super().format_field(value, format_spec)


_FORMATTER = _Formatter()


@dataclass
class PromptTemplate:
    name: str
    template: str
    inputs: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    description: str = ""

    def fields(self) -> set[str]:
        return {f.split(".")[0].split("[")[0] for _, f, _, _ in _FORMATTER.parse(self.template) if f}

    def render(self, values: dict[str, Any]) -> str:
        """The question (``User: ...\\nAssistant:`` is added by ``PromptSet.prompt_text``)."""
        missing = self.fields() - set(values)
        if missing:
            raise PromptSetError(
                f"prompt {self.name!r}: the template needs {sorted(missing)} but the input gives "
                f"{sorted(k for k in values if k != 'expect')}; add them to the input (or --set NAME=VALUE)"
            )
        return _FORMATTER.format(self.template, **values)


@dataclass
class PromptSet:
    name: str
    prompts: list[PromptTemplate]
    description: str = ""
    model: Path | None = None
    task: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def select(self, names: list[str] | None) -> list[PromptTemplate]:
        if not names:
            return self.prompts
        known = {p.name: p for p in self.prompts}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PromptSetError(f"no prompt named {unknown} in set {self.name!r}; it has {sorted(known)}")
        return [known[n] for n in names]

    @staticmethod
    def prompt_text(question: str) -> str:
        return chat_prompt(question)

    def check(self, answer: str | None, expect: Any) -> bool | None:
        """Whether ``answer`` equals ``expect`` as the task's parser reads both; None when unknowable."""
        if answer is None or expect is None or self.task is None:
            return None if expect is None or self.task is None else False
        parse = get_task(self.task).parse_answer
        got, want = parse(answer), parse(str(expect))
        return got is not None and got == want


def _read(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path}: not valid JSON ({e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PromptSetError(f"{path}: not valid YAML ({e})") from None
    raise PromptSetError(f"{path}: a prompt set is a .yaml, .yml or .json file")


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read and validate a prompt set (YAML or JSON)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prompt set at {path}")
    data = _read(path)
    where = str(path)
    if not isinstance(data, dict):
        raise PromptSetError(f"{where}: the top level must be a mapping with 'name' and 'prompts'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PromptSetError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "prompts"):
        if key not in data:
            raise PromptSetError(f"{where}: missing {key!r}")
    if not isinstance(data["prompts"], list) or not data["prompts"]:
        raise PromptSetError(f"{where}: 'prompts' must be a non-empty list of {{name, template, inputs}}")
    task = data.get("task")
    if task is not None and task not in task_names():
        raise PromptSetError(f"{where}: unknown task {task!r}; choose one of {', '.join(task_names())}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PromptSetError(f"{where}: 'defaults' must be a mapping")
    for key, value in defaults.items():
        if key not in GENERATION_KEYS:
            raise PromptSetError(f"{where}: unknown default {key!r}; allowed: {sorted(GENERATION_KEYS)}")
        try:
            defaults[key] = GENERATION_KEYS[key](value)
        except (TypeError, ValueError):
            raise PromptSetError(f"{where}: default {key}={value!r} is not a {GENERATION_KEYS[key].__name__}") from None
    prompts, seen = [], set()
    for i, item in enumerate(data["prompts"]):
        at = f"{where}: prompts[{i}]"
        if not isinstance(item, dict):
            raise PromptSetError(f"{at} must be a mapping with 'name' and 'template'")
        bad = set(item) - _PROMPT_KEYS
        if bad:
            raise PromptSetError(f"{at}: unknown key(s) {sorted(bad)}; allowed: {sorted(_PROMPT_KEYS)}")
        if not isinstance(item.get("name"), str) or not isinstance(item.get("template"), str):
            raise PromptSetError(f"{at}: 'name' and 'template' must both be strings")
        if item["name"] in seen:
            raise PromptSetError(f"{at}: the name {item['name']!r} is used twice")
        seen.add(item["name"])
        inputs = item.get("inputs", [{}])
        if not isinstance(inputs, list) or not all(isinstance(x, dict) for x in inputs) or not inputs:
            raise PromptSetError(f"{at} ({item['name']}): 'inputs' must be a non-empty list of mappings")
        p = PromptTemplate(item["name"], item["template"], [dict(x) for x in inputs], item.get("description", ""))
        try:
            p.fields()
        except ValueError as e:
            raise PromptSetError(f"{at} ({p.name}): bad template {p.template!r} ({e})") from None
        for j, values in enumerate(p.inputs):
            missing = p.fields() - set(values)
            if missing:
                raise PromptSetError(f"{at} ({p.name}): inputs[{j}] lacks {sorted(missing)} used by the template")
        prompts.append(p)
    model = data.get("model")
    return PromptSet(
        name=str(data["name"]),
        prompts=prompts,
        description=str(data.get("description", "")),
        model=(path.parent / model).resolve() if model else None,
        task=task,
        defaults=defaults,
    )


def run_prompt_set(
    model,
    prompt_set: PromptSet,
    *,
    names: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    tokenizer=None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Run the prompts; one row per input: prompt, question, thinking, answer, expect, correct, text.

    overrides: field values for one run of each template instead of its inputs, e.g. ``{"n": 1994}``
        (fields not given come from the template's first input).
    Generation settings: the arguments, else the set's ``defaults``, else greedy with 64 new tokens.
    """
    import torch

    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.rollout import decode_completion, encode_prompt, sample_completions, stop_ids

    tok = tokenizer_of(model, tokenizer)
    d = prompt_set.defaults
    settings = {
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else d.get("max_new_tokens", 64),
        "temperature": temperature if temperature is not None else d.get("temperature", 0.0),
        "top_p": top_p if top_p is not None else d.get("top_p", 1.0),
    }
    gen = torch.Generator(device=model.device).manual_seed(seed if seed is not None else d.get("seed", 0))
    rows = []
    for template in prompt_set.select(names):
        if overrides:  # one run: the first input's fields, replaced by the given ones (no expect unless given)
            first = {k: v for k, v in template.inputs[0].items() if k != "expect"}
            inputs = [{**first, **overrides}]
        else:
            inputs = template.inputs
        for values in inputs:
            question = template.render(values)
            text = prompt_set.prompt_text(question)
            ro = sample_completions(
                model,
                [encode_prompt(tok, text)],
                1,
                max_new_tokens=settings["max_new_tokens"],
                stop=stop_ids(tok),
                temperature=settings["temperature"],
                top_p=settings["top_p"],
                generator=gen,
            )
            completion = decode_completion(tok, ro.completions[0])
            answer = extract_answer(completion)
            expect = values.get("expect")
            rows.append(
                {
                    "prompt": template.name,
                    "inputs": {k: v for k, v in values.items() if k != "expect"},
                    "question": question,
                    "thinking": extract_think(completion),
                    "answer": answer,
                    "expect": expect,
                    "correct": prompt_set.check(answer, expect),
                    "completion": completion,
                    "finished": ro.finished[0],
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a readable report: prompt, thinking, answer (and whether it is right)."""
    out = []
    for r in rows:
        args = " ".join(f"{k}={v}" for k, v in r["inputs"].items())
        out.append(f"[{r['prompt']}{' ' + args if args else ''}] {r['question']}")
        out.append(f"  thinking: {r['thinking'] if r['thinking'] is not None else '(none: no <think>...</think>)'}")
        verdict = ""
        if r["correct"] is not None:
            verdict = f"   ({'right' if r['correct'] else 'wrong'}; expected {r['expect']})"
        out.append(f"  answer:   {r['answer'] if r['answer'] is not None else '(none)'}{verdict}")
        if r["answer"] is None:
            out.append(f"  raw:      {r['completion']!r}")
    return "\n".join(out)


__all__ = [
    "PromptSet",
    "PromptSetError",
    "PromptTemplate",
    "format_rows",
    "load_prompt_set",
    "run_prompt_set",
]
