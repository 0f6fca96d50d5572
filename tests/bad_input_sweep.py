"""The machinery of the bad-input sweep (``tests/test_bad_input.py`` holds the cases).

A case does one bad thing, through the public API or the command line, in a fresh folder, and is judged:

    clear      refused (a command: the expected non-zero exit) with a message that names the problem;
               or, where a warning is the right answer, warned by name; and nothing on disk changed
               (no file removed or changed, no new file left behind; an empty new folder is harmless)
    vague      refused, but the message does not name the problem
    traceback  a raw exception (IndexError, TypeError from inside torch, ...) or one escaping the command
    accepted   no error at all (a misspelled field silently ignored, NaN weights loaded)
    changed    files that were there before are removed or changed (or the case's own check failed)
    hang       still running after the case's time limit (a FIFO read, a quadratic regular expression)
    allocates  about to allocate a model far larger than memory (stopped by a guard, never allocated)
    n/a        the case cannot be expressed here (a flag or module that does not exist in this version)

The same cases run on any version of the package that ``import workbench`` finds (modules are looked up
by their current and their earlier names), which is how ``scripts/count_bad_input.py`` counts them
before and after a change. Nothing here imports ``workbench`` at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import re
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERDICTS = ("clear", "vague", "traceback", "accepted", "changed", "hang", "allocates", "n/a")


class NotHere(Exception):
    """The module or flag a case needs does not exist in this version of the package."""


class Hung(BaseException):
    """Raised by the timer: the case ran past its limit (a BaseException, so no handler swallows it)."""


class WouldAllocate(BaseException):
    """Raised by the allocation guard instead of building a model that cannot fit in memory."""


def wb(*names: str):
    """The first of these modules that exists in the package being tested (current name first, then earlier
    ones). A module found elsewhere (an editable install of another checkout) does not count."""
    root = package_root() / "workbench"
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent is missing, or is a module and not a package
            continue
        if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(root):
            return importlib.import_module(name)
    raise NotHere(f"none of {names} exists here")


def package_root() -> Path:
    """The folder holding the ``workbench`` package being tested (its data/ has the shipped model)."""
    return Path(importlib.import_module("workbench").__file__).resolve().parent.parent


def tree(root: Path) -> dict[str, str]:
    """Every file and folder below ``root``: files with the SHA-256 of their bytes, links with their target."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "<dir>"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "<special>"  # a FIFO a case made: never opened here
    return out


# ---- one case ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """``python -m workbench ARGV``; ``{tmp}`` is the case's folder, ``{model}`` the shipped tiny model."""

    argv: tuple[str, ...]

    def resolved(self, tmp: Path) -> list[str]:
        model = str(package_root() / "data" / "tiny-model")
        return [a.replace("{tmp}", str(tmp)).replace("{model}", model) for a in self.argv]


def cli(*argv: str) -> Callable[[Path], Command]:
    return lambda tmp: Command(argv)


@dataclass(frozen=True)
class Case:
    klass: str  # the class of bad input (what the counts are grouped by)
    name: str
    act: Callable[[Path], Any]  # the bad call (API), or ``cli(...)`` (a command)
    expect: str | tuple[str, ...] | None  # regular expressions the message must match; None: it must work
    prepare: Callable[[Path], None] | None = None  # files the case needs, made before the snapshot
    owner: str = ""  # another area's work: the case is expected to fail until that lands
    warn: bool = False  # a warning that names the problem is a right answer too (a refusal still is)
    code: int = 2  # the exit status a command must give
    writes: bool = False  # the case may write new files (a run that starts); ``after`` checks them
    after: Callable[[Path], None] | None = None  # further checks once the case has answered
    limit: float = 30.0  # seconds before it is a hang
    context: Callable[[], contextlib.AbstractContextManager] | None = None  # e.g. a patch for the case

    @property
    def id(self) -> str:
        return f"{self.klass}: {self.name}"


@dataclass
class Outcome:
    verdict: str
    message: str


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def ring(signum, frame):
        raise Hung(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


GUARD_PARAMETERS = 4e8  # a model above this (1.6 GB in float32) is never built by a case


def rough_parameters(c: Any) -> int:
    """About how many numbers ``Model(c)`` allocates (weights and rope tables), from the config alone."""
    D, H = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = D * H * qk if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank * H * qk
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    attn = q + kv + H * c.v_head_dim * D
    moe = 3 * D * c.moe_intermediate_size * (c.n_routed_experts + c.n_shared_experts) + c.n_routed_experts * D
    dense_layers = c.first_k_dense_replace
    moe_layers = c.num_hidden_layers - dense_layers + c.num_nextn_predict_layers
    body = dense_layers * (attn + 3 * D * c.intermediate_size) + moe_layers * (attn + moe)
    return int(body + 2 * c.vocab_size * D + c.max_position_embeddings * c.qk_rope_head_dim)


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@contextlib.contextmanager
def allocation_guard() -> Iterator[None]:
    """``Model(config)`` off the meta device raises ``WouldAllocate`` for a model above the guard: a case
    that would allocate 671B parameters is judged without the machine running out of memory."""
    import torch

    Model = wb("workbench.model").Model
    real = Model.__init__

    def guarded(self, config, *args, **kwargs):
        try:
            n = rough_parameters(config)
        except Exception:  # a config too broken to estimate: the constructor will say so
            n = 0
        if n > GUARD_PARAMETERS and torch.empty(0).device.type != "meta":
            # the library's own refusal comes first where the version has one (Model.__init__ checks the
            # memory before allocating): only a model it would really allocate is stopped here
            accounting = wb("workbench.model.accounting") if _has_module("workbench.model.accounting") else None
            if accounting is not None and hasattr(accounting, "check_fits"):
                accounting.check_fits(config, torch.get_default_device(), torch.get_default_dtype(),
                                      what="Model(config)")  # fmt: skip
            raise WouldAllocate(f"Model() would allocate about {n:.3g} parameters")
        real(self, config, *args, **kwargs)

    Model.__init__ = guarded
    try:
        yield
    finally:
        Model.__init__ = real


def _run_command(argv: list[str]) -> tuple[int, str]:
    main = wb("workbench.cli").main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse refusing a flag
            code = e.code if isinstance(e.code, int) else 2
    return int(code or 0), err.getvalue()


def _matches(case: Case, text: str) -> bool:
    patterns = (case.expect,) if isinstance(case.expect, str) else case.expect
    return all(re.search(p, text, re.IGNORECASE | re.DOTALL) for p in patterns)


def run_case(case: Case, folder: Path) -> Outcome:
    """Run one case in ``folder`` (created empty) and judge it."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if case.prepare is not None:
            case.prepare(folder)
    except (NotHere, ImportError, AttributeError) as e:
        return Outcome("n/a", f"cannot prepare here: {e}")
    before = tree(folder)
    raised: BaseException | None = None
    result: Any = None
    command = code = None
    err = ""
    with contextlib.ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stack.enter_context(allocation_guard())
            if case.context is not None:
                stack.enter_context(case.context())
            with time_limit(case.limit):
                result = case.act(folder)
                if isinstance(result, Command):
                    command = result.resolved(folder)
                    code, err = _run_command(command)
        except Hung as e:
            return Outcome("hang", str(e))
        except WouldAllocate as e:
            return Outcome("allocates", str(e))
        except NotHere as e:
            return Outcome("n/a", str(e))
        except BaseException as e:  # judged below; KeyboardInterrupt and SystemExit included
            raised = e
    warned = "\n".join(str(w.message) for w in caught)
    verdict, message = _judge(case, command, code, err, raised, warned)
    if verdict == "clear" and not case.writes and _changed(before, tree(folder)):
        verdict, message = "changed", f"files changed: {_difference(before, tree(folder))}; {message}"
    if verdict == "clear" and case.after is not None:
        try:
            case.after(folder)
        except AssertionError as e:
            verdict, message = "changed", f"after the answer: {e}; {message}"
    return Outcome(verdict, message)


def _judge(case: Case, command, code, err: str, raised: BaseException | None, warned: str) -> tuple[str, str]:
    if isinstance(raised, ModuleNotFoundError):
        return "n/a", str(raised)
    if command is not None and raised is None:
        text = err.strip()
        if "unrecognized arguments" in text:
            return "n/a", text[-300:]
        if case.expect is None:
            return ("clear" if code == 0 else "vague"), f"exit {code}: {text[-300:]}"
        if code == 0:
            ok = case.warn and _matches(case, text + "\n" + warned)
            return ("clear" if ok else "accepted"), f"exit 0: {(text + warned)[-300:]}"
        if "Traceback (most recent call last)" in text:
            return "traceback", text[-300:]
        right = code == case.code and _matches(case, text + "\n" + warned)
        return ("clear" if right else "vague"), f"exit {code}: {text[-300:]}"
    if raised is None:
        if case.expect is None or (case.warn and _matches(case, warned)):
            return "clear", warned[-300:]
        return "accepted", f"no error{'; warnings: ' + warned[-300:] if warned else ''}"
    message = f"{type(raised).__name__}: {raised}"[-400:]
    if case.expect is None:
        return "traceback", message
    if isinstance(raised, (ValueError, TypeError, OSError)) and _matches(case, str(raised)):
        return "clear", message
    if isinstance(raised, (ValueError, OSError)):
        return "vague", message
    return "traceback", message


def _changed(before: dict[str, str], after: dict[str, str]) -> bool:
    """Whether anything that was there is gone or different, or a file (not merely an empty folder) is new:
    a refused command must not leave a marker behind that changes what the next command may do."""
    if any(after.get(k) != v for k, v in before.items()):
        return True
    return any(v != "<dir>" for k, v in after.items() if k not in before)


def _difference(before: dict[str, str], after: dict[str, str]) -> str:
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    new = sorted(set(after) - set(before))
    return f"removed {gone[:5]}, changed {changed[:5]}, new {new[:5]}"


__all__ = [
    "VERDICTS",
    "Case",
    "Command",
    "Hung",
    "NotHere",
    "Outcome",
    "WouldAllocate",
    "allocation_guard",
    "cli",
    "package_root",
    "rough_parameters",
    "run_case",
    "time_limit",
    "tree",
    "wb",
]
