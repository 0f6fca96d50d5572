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

What a file may be (a server reads these at start, so a bad one must fail loudly, never hang or eat
memory): a regular file (a FIFO would block the reader, a directory or a device is refused with a
message) of at most ``MAX_FILE_BYTES``; YAML whose aliases expand to at most ``MAX_NODES`` nodes (a few
lines of nested aliases can otherwise expand to billions) and whose nesting is at most ``MAX_DEPTH`` deep
(checked on the parser's events, before anything recursive runs); templates whose fields are all named
(``{a}``, never ``{}`` or ``{0}``), plain names (no ``{a.attr}`` or ``{a[0]}``), and whose format specs
are ``digits`` or Python's standard ones with widths and precisions of at most ``MAX_FORMAT_WIDTH``
(``{a:>999999999}`` would build a gigabyte string); inputs whose values are strings, numbers or booleans.
Every input of the file is rendered once at load, so a value the template cannot format is found then.
"""

from __future__ import annotations

import json
import os
import re
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.tasks import chat_prompt, get_task, spell, task_names
from workbench.tasks.rewards import extract_answer, extract_think

GENERATION_KEYS = {"max_new_tokens": int, "temperature": float, "top_p": float, "seed": int}
_TOP_KEYS = {"name", "description", "model", "task", "defaults", "prompts"}
_PROMPT_KEYS = {"name", "template", "inputs", "description"}

MAX_FILE_BYTES = 1 << 20  # a prompt set is a small file: at most 1 MiB
MAX_NODES = 100_000  # YAML nodes after expanding aliases
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_FORMAT_WIDTH = 64  # the largest width or precision a format spec may ask for
MAX_VALUE_CHARS = 10_000  # the longest input value (a request's too)

# Python's format-spec mini-language: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_SPEC = re.compile(
    r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?z?#?0?(?P<width>\d+)?[,_]?(?:\.(?P<precision>\d+))?"
    r"[bcdeEfFgGnosxX%]?",
    re.DOTALL,
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PromptSetError(ValueError):
    """A prompt set file that cannot be used; the message says where and how to fix it."""


class PromptInputError(PromptSetError):
    """Inputs that a prompt cannot take; ``field`` names the input at fault (for an API's error)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def check_template(template: str) -> list[str]:
    """The field names of a template, in order; raises ValueError (the reason) for anything not allowed."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"malformed braces ({e}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"positional field {{{name}}}: name every field, e.g. {{a}}, and give it in the inputs")
        if not _NAME.fullmatch(name):
            raise ValueError(f"field {{{name}}}: a field is a plain name (no attributes, indexes or spaces)")
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"field {{{name}!{conversion}}}: the conversion must be !s, !r or !a")
        spec = spec or ""
        if "{" in spec or "}" in spec:
            raise ValueError(f"field {{{name}:{spec}}}: nested fields in a format spec are not allowed")
        if spec != "digits":
            m = _SPEC.fullmatch(spec)
            if m is None:
                raise ValueError(
                    f"field {{{name}:{spec}}}: {spec!r} is not a format spec (use digits, or e.g. >5, .2f)"
                )
            for part in ("width", "precision"):
                if m.group(part) is not None and int(m.group(part)) > MAX_FORMAT_WIDTH:
                    raise ValueError(
                        f"field {{{name}:{spec}}}: a {part} of {int(m.group(part))} is too large "
                        f"(at most {MAX_FORMAT_WIDTH})"
                    )
        names.append(name)
    return names


def check_value(name: str, value: Any) -> None:
    """An input value must be a string (at most ``MAX_VALUE_CHARS``), a number or a boolean."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if isinstance(value, int) and value.bit_length() > 4 * MAX_VALUE_CHARS:
            raise PromptInputError(f"input {name!r}: the integer is too large", name)
        return
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise PromptInputError(f"input {name!r} is {len(value)} characters; at most {MAX_VALUE_CHARS}", name)
        return
    raise PromptInputError(f"input {name!r} must be a string, a number or a boolean, got {type(value).__name__}", name)


class _Formatter(string.Formatter):
    """``str.format`` plus ``{field:digits}`` (an integer digit by digit)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec == "digits":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"{{...:digits}} needs an integer, got {value!r}")
            try:
                return spell(int(value))
            except ValueError:
                raise ValueError(f"{{...:digits}} needs an integer, got {value!r}") from None
        return super().format_field(value, format_spec)


_FORMATTER = _Formatter()


@dataclass
class PromptTemplate:
    name: str
    template: str
    inputs: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    description: str = ""

    def fields(self) -> list[str]:
        """The template's input names, each once, in the order they first appear."""
        return list(dict.fromkeys(check_template(self.template)))

    def render(self, values: dict[str, Any], *, strict: bool = False) -> str:
        """The question (``User: ...\nAssistant:`` is added by ``PromptSet.prompt_text``).

        strict: refuse inputs the template does not use (an API's request; ``expect`` is never an input)."""
        given = {k: v for k, v in values.items() if k != "expect"}
        missing = [f for f in self.fields() if f not in given]
        if missing:
            raise PromptInputError(
                f"prompt {self.name!r}: the template needs {missing} but the input gives "
                f"{sorted(given)}; add them to the inputs{'' if strict else ' (or --set NAME=VALUE)'}",
                missing[0],
            )
        if strict:
            extra = sorted(set(given) - set(self.fields()))
            if extra:
                raise PromptInputError(
                    f"prompt {self.name!r} takes only {self.fields()}; remove {extra} from the inputs", extra[0]
                )
        for k, v in given.items():
            check_value(k, v)
        try:
            return _FORMATTER.format(self.template, **given)
        except (ValueError, TypeError, OverflowError) as e:
            raise PromptInputError(
                f"prompt {self.name!r}: the inputs {given} cannot fill {self.template!r} ({e})"
            ) from None

    def expected(self, values: dict[str, Any]) -> Any:
        """The file's ``expect`` for these exact inputs, if the file lists them (else None)."""
        given = {k: v for k, v in values.items() if k != "expect"}
        for item in self.inputs:
            if {k: v for k, v in item.items() if k != "expect"} == given:
                return item.get("expect")
        return None


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


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file of at most ``MAX_FILE_BYTES``, opened without blocking (a FIFO is refused,
    not waited on)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"no prompt set at {path}") from None
    except IsADirectoryError:
        raise PromptSetError(f"{path} is a directory; give the prompt set file inside it") from None
    except OSError as e:
        raise PromptSetError(f"{path}: cannot be opened ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise PromptSetError(f"{path} is a directory; give the prompt set file inside it")
        if not stat.S_ISREG(info.st_mode):
            raise PromptSetError(f"{path} is not a regular file (a FIFO, socket or device); give a .yaml or .json file")
        if info.st_size > MAX_FILE_BYTES:
            raise PromptSetError(f"{path} is {info.st_size} bytes; a prompt set is at most {MAX_FILE_BYTES} bytes")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:  # read what is there, never more than the bound (the file may grow)
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise PromptSetError(f"{path} is larger than {MAX_FILE_BYTES} bytes; a prompt set is a small file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_yaml_shape(text: str, where: str) -> None:
    """Refuse YAML that would expand past ``MAX_NODES`` nodes or nest deeper than ``MAX_DEPTH``, reading only
    the parser's events (iterative: nothing recursive runs before the depth is known)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    sizes: dict[str, int] = {}  # anchor -> nodes its subtree expands to
    stack: list[tuple[str | None, int]] = []  # open collections: (anchor, node count when it opened)
    total = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in stack):
                raise PromptSetError(f"{where}: the alias *{event.anchor} refers to itself; a prompt set is a tree")
            total += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            stack.append((event.anchor, total))
            if len(stack) > MAX_DEPTH:
                raise PromptSetError(f"{where}: nested deeper than {MAX_DEPTH} levels; a prompt set is a shallow file")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, opened = stack.pop()
            if anchor:
                sizes[anchor] = total - opened + 1
        if total > MAX_NODES:
            raise PromptSetError(
                f"{where}: expands to more than {MAX_NODES} values (YAML aliases repeat what they refer to); "
                "write the prompts out, without nested aliases"
            )


def _depth(obj: Any) -> int:
    """How deeply mappings and lists nest in obj (iterative)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        item, d = todo.pop()
        if isinstance(item, dict):
            items = list(item.values())
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        todo += [(x, d + 1) for x in items]
    return deepest


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise PromptSetError(f"{path}: a prompt set is a .yaml, .yml or .json file")
    raw = _read_regular_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{path}: not UTF-8 text ({e})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise PromptSetError(
                f"{path}: nested deeper than {MAX_DEPTH} levels; a prompt set is a shallow file"
            ) from None
    else:
        import yaml

        try:
            _check_yaml_shape(text, str(path))
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as e:
            raise PromptSetError(f"{path}: not valid YAML ({e})") from None
    if _depth(data) > MAX_DEPTH:
        raise PromptSetError(f"{path}: nested deeper than {MAX_DEPTH} levels; a prompt set is a shallow file")
    return data


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read and validate a prompt set (YAML or JSON)."""
    path = Path(path)
    data = _read(path)
    where = str(path)
    if not isinstance(data, dict):
        raise PromptSetError(f"{where}: the top level must be a mapping with 'name' and 'prompts'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PromptSetError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "prompts"):
        if key not in data:
            raise PromptSetError(f"{where}: missing {key!r}")
    if not isinstance(data["name"], str) or not data["name"]:
        raise PromptSetError(f"{where}: 'name' must be a non-empty string")
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
        kind = GENERATION_KEYS[key]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            defaults[key] = kind(value)
            if kind is int and float(value) != defaults[key]:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise PromptSetError(f"{where}: default {key}={value!r} is not a {kind.__name__}") from None
    prompts, seen = [], set()
    for i, item in enumerate(data["prompts"]):
        at = f"{where}: prompts[{i}]"
        if not isinstance(item, dict):
            raise PromptSetError(f"{at} must be a mapping with 'name' and 'template'")
        bad = set(item) - _PROMPT_KEYS
        if bad:
            raise PromptSetError(f"{at}: unknown key(s) {sorted(map(str, bad))}; allowed: {sorted(_PROMPT_KEYS)}")
        if not isinstance(item.get("name"), str) or not isinstance(item.get("template"), str):
            raise PromptSetError(f"{at}: 'name' and 'template' must both be strings")
        if not _NAME.fullmatch(item["name"]):
            raise PromptSetError(f"{at}: the name {item['name']!r} must be a plain name (letters, digits, _)")
        if item["name"] in seen:
            raise PromptSetError(f"{at}: the name {item['name']!r} is used twice")
        seen.add(item["name"])
        inputs = item.get("inputs", [{}])
        if not isinstance(inputs, list) or not all(isinstance(x, dict) for x in inputs) or not inputs:
            raise PromptSetError(f"{at} ({item['name']}): 'inputs' must be a non-empty list of mappings")
        p = PromptTemplate(item["name"], item["template"], [dict(x) for x in inputs], str(item.get("description", "")))
        try:
            fields = p.fields()
        except ValueError as e:
            raise PromptSetError(f"{at} ({p.name}): bad template {p.template!r}: {e}") from None
        for j, values in enumerate(p.inputs):
            missing = [f for f in fields if f not in values]
            if missing:
                raise PromptSetError(f"{at} ({p.name}): inputs[{j}] lacks {missing} used by the template")
            try:
                for k, v in values.items():
                    check_value(str(k), v)
                p.render(values)  # a value the template cannot format is found now, not in a request
            except PromptSetError as e:
                raise PromptSetError(f"{at} ({p.name}): inputs[{j}]: {e}") from None
        prompts.append(p)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise PromptSetError(f"{where}: 'model' must be a folder path relative to the file")
    return PromptSet(
        name=data["name"],
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

    model: a model, or several verticals on one base behind their gate (``workbench.vertical.Verticals``):
        then each request is answered by the model the gate routes it to, and its row says which (``route``:
        the vertical's name, or ``"base"``).

    overrides: field values for one run of each template instead of its inputs, e.g. ``{"n": 1994}``
        (fields not given come from the template's first input).
    Generation settings: the arguments, else the set's ``defaults``, else greedy with 64 new tokens.
    """
    import torch

    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.rollout import decode_completion, encode_prompt, sample_completions, stop_ids
    from workbench.vertical.gate import Verticals

    served = model if isinstance(model, Verticals) else None
    model = served.base if served is not None else model
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
            route = served.gate.route([text])[0] if served is not None else None
            ro = sample_completions(
                served.model_for(route) if served is not None else model,
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
                    **({"route": route or "base"} if served is not None else {}),
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a readable report: prompt, thinking, answer (and whether it is right)."""
    out = []
    for r in rows:
        args = " ".join(f"{k}={v}" for k, v in r["inputs"].items())
        by = f"  (answered by {r['route']})" if "route" in r else ""
        out.append(f"[{r['prompt']}{' ' + args if args else ''}] {r['question']}{by}")
        out.append(f"  thinking: {r['thinking'] if r['thinking'] is not None else '(none: no <think>...</think>)'}")
        verdict = ""
        if r["correct"] is not None:
            verdict = f"   ({'right' if r['correct'] else 'wrong'}; expected {r['expect']})"
        out.append(f"  answer:   {r['answer'] if r['answer'] is not None else '(none)'}{verdict}")
        if r["answer"] is None:
            out.append(f"  raw:      {r['completion']!r}")
    return "\n".join(out)


__all__ = [
    "PromptInputError",
    "PromptSet",
    "PromptSetError",
    "PromptTemplate",
    "format_rows",
    "load_prompt_set",
    "run_prompt_set",
]
