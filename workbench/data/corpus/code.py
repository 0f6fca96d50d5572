"""The code domain of the generated corpus (see ``workbench.data.corpus``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import MappingProxyType

# (plural, singular) pairs, so that `for price in prices:` reads naturally
# fmt: off
_NOUNS = (
    ("prices", "price"), ("scores", "score"), ("items", "item"), ("values", "value"), ("points", "point"),
    ("orders", "order"), ("numbers", "number"), ("weights", "weight"), ("counts", "count"), ("sizes", "size"),
    ("ages", "age"), ("steps", "step"),
)
# fmt: on
_WORD_NOUNS = (("words", "word"), ("names", "name"), ("tags", "tag"), ("labels", "label"))
_WORDS = ("apple", "river", "stone", "cloud", "lamp", "tree", "bird", "road", "salt", "iron", "moon")
_LIMIT_NAMES = ("limit", "threshold", "cutoff", "floor", "bound")
_FACTOR_NAMES = ("factor", "scale", "k", "rate", "times")
_COMPARISONS: Mapping[str, Callable[[int, int], bool]] = MappingProxyType(
    {
        ">": lambda x, y: x > y,
        "<": lambda x, y: x < y,
        ">=": lambda x, y: x >= y,
        "<=": lambda x, y: x <= y,
    }
)


def _int_list(rng: random.Random, lo: int = 0, hi: int = 30) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 7))]


def _code_sum_if(rng: random.Random) -> tuple[list[str], str, object]:
    plural, single = rng.choice(_NOUNS)
    limit = rng.choice(_LIMIT_NAMES)
    op = rng.choice(tuple(_COMPARISONS))
    acc = rng.choice(("total", "result", "acc", "s"))
    name = f"{rng.choice(('sum', 'total', 'add'))}_{plural}_{rng.choice(('above', 'past', 'over'))}"
    lines = [
        f"def {name}({plural}, {limit}):",
        f"    {acc} = 0",
        f"    for {single} in {plural}:",
        f"        if {single} {op} {limit}:",
        f"            {acc} += {single}",
        f"    return {acc}",
    ]
    xs, t = _int_list(rng), rng.randint(0, 30)
    result = sum(x for x in xs if _COMPARISONS[op](x, t))
    return lines, f"{name}({xs}, {t})", result


def _code_count_multiples(rng: random.Random) -> tuple[list[str], str, object]:
    plural, single = rng.choice(_NOUNS)
    divisor = rng.choice(("d", "divisor", "m"))
    counter = rng.choice([c for c in ("count", "n", "hits", "found") if c != single])  # no name clash
    name = f"count_{rng.choice(('multiples', 'divisible', 'even_splits'))}"
    lines = [
        f"def {name}({plural}, {divisor}):",
        f"    {counter} = 0",
        f"    for {single} in {plural}:",
        f"        if {single} % {divisor} == 0:",
        f"            {counter} += 1",
        f"    return {counter}",
    ]
    xs, d = _int_list(rng, 1, 50), rng.randint(2, 7)
    return lines, f"{name}({xs}, {d})", sum(1 for x in xs if x % d == 0)


def _code_find_max(rng: random.Random) -> tuple[list[str], str, object]:
    plural, single = rng.choice(_NOUNS)
    best = rng.choice(("best", "top", "largest", "current"))
    want_max = rng.random() < 0.5
    op = ">" if want_max else "<"
    name = f"{'largest' if want_max else 'smallest'}_{single}"
    lines = [
        f"def {name}({plural}):",
        f"    {best} = {plural}[0]",
        f"    for {single} in {plural}[1:]:",
        f"        if {single} {op} {best}:",
        f"            {best} = {single}",
        f"    return {best}",
    ]
    xs = _int_list(rng, 0, 99)
    return lines, f"{name}({xs})", max(xs) if want_max else min(xs)


def _code_scale_filter(rng: random.Random) -> tuple[list[str], str, object]:
    plural, single = rng.choice(_NOUNS)
    factor = rng.choice(_FACTOR_NAMES)
    out = rng.choice(("result", "out", "kept", "scaled"))
    keep_even = rng.random() < 0.5
    cond = f"{single} % 2 == 0" if keep_even else f"{single} % 2 == 1"
    name = f"scale_{'even' if keep_even else 'odd'}_{plural}"
    lines = [
        f"def {name}({plural}, {factor}):",
        f"    {out} = []",
        f"    for {single} in {plural}:",
        f"        if {cond}:",
        f"            {out}.append({single} * {factor})",
        f"    return {out}",
    ]
    xs, f = _int_list(rng, 0, 20), rng.randint(2, 5)
    result = [x * f for x in xs if x % 2 == (0 if keep_even else 1)]
    return lines, f"{name}({xs}, {f})", result


def _code_collatz(rng: random.Random) -> tuple[list[str], str, object]:
    n = rng.choice(("n", "x", "value", "start"))
    steps = rng.choice(("steps", "count", "moves"))
    name = rng.choice(("collatz_steps", "steps_to_one", "count_halvings"))
    lines = [
        f"def {name}({n}):",
        f"    {steps} = 0",
        f"    while {n} != 1:",
        f"        if {n} % 2 == 0:",
        f"            {n} = {n} // 2",
        "        else:",
        f"            {n} = 3 * {n} + 1",
        f"        {steps} += 1",
        f"    return {steps}",
    ]
    start = rng.randint(2, 40)
    value, result = start, 0
    while value != 1:
        value = value // 2 if value % 2 == 0 else 3 * value + 1
        result += 1
    return lines, f"{name}({start})", result


def _code_count_words(rng: random.Random) -> tuple[list[str], str, object]:
    plural, single = rng.choice(_WORD_NOUNS)
    counts = rng.choice(("counts", "seen", "freq", "tally"))
    name = f"count_{plural}"
    lines = [
        f"def {name}({plural}):",
        f"    {counts} = {{}}",
        f"    for {single} in {plural}:",
        f"        {counts}[{single}] = {counts}.get({single}, 0) + 1",
        f"    return {counts}",
    ]
    pool = rng.sample(_WORDS, 3)
    words = [rng.choice(pool) for _ in range(rng.randint(3, 6))]
    result: dict[str, int] = {}
    for w in words:
        result[w] = result.get(w, 0) + 1
    return lines, f"{name}({words})", result


def _code_class(rng: random.Random) -> tuple[list[str], str, object]:
    cls = rng.choice(("Counter", "Account", "Tank", "Meter", "Stack"))
    attr = rng.choice(("value", "level", "balance", "amount"))
    method = rng.choice(("add", "grow", "push", "deposit"))
    lines = [
        f"class {cls}:",
        "    def __init__(self, start):",
        f"        self.{attr} = start",
        "",
        f"    def {method}(self, amount):",
        f"        self.{attr} += amount",
        f"        return self.{attr}",
    ]
    start, amount = rng.randint(0, 50), rng.randint(1, 20)
    return lines, f"{cls}({start}).{method}({amount})", start + amount


_CODE_TEMPLATES = (
    _code_sum_if,
    _code_count_multiples,
    _code_find_max,
    _code_scale_filter,
    _code_collatz,
    _code_count_words,
    _code_class,
)


def code_document(rng: random.Random) -> str:
    """One or two small Python definitions, each followed by a call and its true result."""
    blocks = []
    for template in rng.sample(_CODE_TEMPLATES, rng.randint(1, 2)):
        lines, call, result = template(rng)
        if rng.random() < 0.3:
            lines = [f"# {call.split('(')[0].replace('_', ' ')}", *lines]
        blocks.append("\n".join([*lines, "", "", f"print({call})  # {result!r}"]))
    return "\n\n\n".join(blocks)
