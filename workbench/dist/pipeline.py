"""Pipeline parallelism: schedules of forward and backward chunks over stages, simulated in time.

A model cut into PP stages (consecutive layers, one per rank) passes each micro-batch from stage to stage
forward and its gradient back. A rank idles while it waits for its neighbours: the **bubble**. Three
schedules, each a fixed order of chunks per rank, and their bubbles as DeepSeek's DualPipe notes give
them (F: forward of one chunk, B: its full backward, W: the part of B that computes weight gradients,
F&B: a forward and a backward chunk run overlapped):

* **1F1B**: after PP - 1 - s warm-up forwards, stage s alternates one forward and one backward.
  Bubble (PP - 1)(F + B).
* **ZB1P** (zero bubble, ZB-H1): the backward splits into B for the inputs (what the previous stage waits
  for) and W for the weights (which nobody waits for); W is postponed into idle time, as long as no stage
  holds more micro-batches than 1F1B's peak (PP, on stage 0: the later stages have room to wait with
  their W's). Bubble (PP - 1)(F + B - 2W).
* **DualPipe** (DeepSeek-V3): micro-batches enter from both ends; rank r holds stage r of one direction
  and stage PP - 1 - r of the other (twice the parameters), so one direction's forward runs overlapped
  with the other's backward (F&B), and W fills the rest. Bubble (PP/2 - 1)(F&B + B - 3W). The order here
  is generated step by step as in github.com/deepseek-ai/DualPipe (``dualpipe.py``, steps 1-8).

The formulas are exact for some chunk times only; the simulation is the measure. 1F1B's holds for any
times; ZB1P's where W fits the gaps it fills (W <= F and W <= B - W, the zero-bubble paper's setting);
DualPipe's when F, B - W and W are equal (otherwise it is off by a fraction of a chunk per stage pair).

``simulate`` runs a schedule on chunk times (measured on our own blocks by ``workbench.dist.timing``):
every rank takes its chunks in order, each as soon as its rank is free and its inputs have arrived
(``comm``: the time of one stage-to-stage send). ``Timeline`` holds every chunk's start and end (the
figures of lesson 11), the makespan and the idle time of each rank.

Communication inside a chunk (MoE dispatch and combine) can be exposed (added to F and B) or hidden by
the overlap of a forward with a backward: ``chunk_times`` builds both cases; the difference in makespan
is what DualPipe's overlap buys. Where it simplifies: chunk times are the same for every micro-batch and
stage, the loss and the embedding cost nothing extra, and memory is not simulated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SCHEDULES = ("1f1b", "zb1p", "dualpipe")


@dataclass(frozen=True)
class Chunk:
    """One unit of work on a rank: ``kind`` F, B (full backward), Bi (inputs only), W (weights), or FB (a
    forward of ``mb`` in ``direction`` overlapped with a backward of ``mb2`` in ``direction2``)."""

    kind: str
    mb: int
    direction: int = 0
    mb2: int = -1
    direction2: int = 0


@dataclass(frozen=True)
class ChunkTimes:
    F: float  # forward of one chunk
    B: float  # its full backward (inputs and weights)
    W: float  # the weight-gradient part of B
    FB: float | None = None  # an overlapped forward + backward pair (default F + B: no overlap)
    comm: float = 0.0  # a stage-to-stage send

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "comm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a time >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"W={self.W} is part of B={self.B}: it cannot be larger")
        if self.FB is not None and not max(self.F, self.B) <= self.FB:
            raise ValueError(f"an overlapped pair F&B={self.FB} holds both chunks' computation: it takes at least "
                             f"max(F, B) = {max(self.F, self.B)}")  # fmt: skip

    @property
    def overlapped(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, chunk: Chunk) -> float:
        return {"F": self.F, "B": self.B, "Bi": self.B - self.W, "W": self.W, "FB": self.overlapped}[chunk.kind]


@dataclass
class Timeline:
    schedule: str
    stages: int
    micro_batches: int
    slots: list[list[tuple[Chunk, float, float]]]  # per rank: (chunk, start, end)
    makespan: float = 0.0
    idle: list[float] = field(default_factory=list)  # per rank: makespan minus busy time

    @property
    def bubble(self) -> float:
        """The largest idle time of a rank (what the formulas give)."""
        return max(self.idle)


def bubble_formula(schedule: str, stages: int, t: ChunkTimes) -> float:
    """The bubble DeepSeek's DualPipe notes give for each schedule."""
    PP = stages
    if schedule == "1f1b":
        return (PP - 1) * (t.F + t.B)
    if schedule == "zb1p":
        return (PP - 1) * (t.F + t.B - 2 * t.W)
    if schedule == "dualpipe":
        return (PP / 2 - 1) * (t.overlapped + t.B - 3 * t.W)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


# ---- the schedules -----------------------------------------------------------------------------------
def one_f_one_b(stages: int, micro_batches: int) -> list[list[Chunk]]:
    """1F1B: per stage, its warm-up forwards, then forward-backward pairs, then the remaining backwards."""
    order = []
    for s in range(stages):
        warm = min(stages - 1 - s, micro_batches)
        ops = [Chunk("F", j) for j in range(warm)]
        for j in range(micro_batches - warm):
            ops += [Chunk("F", warm + j), Chunk("B", j)]
        ops += [Chunk("B", j) for j in range(micro_batches - warm, micro_batches)]
        order.append(ops)
    return order


def zero_bubble_h1(stages: int, micro_batches: int) -> list[list[Chunk]]:
    """ZB-H1: 1F1B's order with each backward cut to Bi (the input gradient the previous stage waits for).
    The W chunks are not in the order: ``simulate`` places each stage's W's into the time it would
    otherwise idle, and before a forward whenever 1F1B's memory would be exceeded (``stages - s``
    micro-batches in flight on stage s), and runs the remaining ones at the end."""
    return [[Chunk("Bi", c.mb) if c.kind == "B" else c for c in ops] for ops in one_f_one_b(stages, micro_batches)]


def dualpipe(stages: int, micro_batches: int) -> list[list[Chunk]]:
    """DualPipe's order of chunks per rank, generated as ``DualPipe.step`` runs them (both directions carry
    ``micro_batches / 2`` micro-batches; direction 0 enters at rank 0, direction 1 at rank PP - 1)."""
    PP, m = stages, micro_batches
    if PP % 2 or PP < 2 or m % 2 or m < 2 * PP:
        raise ValueError(f"DualPipe needs an even number of stages and an even micro-batch count >= 2 x stages; "
                         f"got stages={PP}, micro_batches={m}")  # fmt: skip
    return [_DualPipeRank(rank, PP, m).order() for rank in range(PP)]


class _DualPipeRank:
    """The chunks of one DualPipe rank, in ``DualPipe.step``'s eight steps."""

    def __init__(self, rank: int, stages: int, micro_batches: int) -> None:
        self.PP, self.m = stages, micro_batches
        self.second_half = rank >= stages // 2  # phase 0 is the reverse direction on the second half
        self.half_rank = min(rank, stages - 1 - rank)
        self.middle = rank in (stages // 2 - 1, stages // 2)
        self.f_next, self.b_next = [0, 0], [0, 0]  # next micro-batch of each direction
        self.weights: deque[Chunk] = deque()  # W chunks postponed by zero-bubble backwards (FIFO)

    def direction(self, phase: int) -> int:
        return phase ^ self.second_half

    def forward(self, phase: int) -> Chunk:
        d = self.direction(phase)
        self.f_next[d] += 1
        return Chunk("F", self.f_next[d] - 1, d)

    def backward(self, phase: int, zb: bool = False) -> Chunk:
        d = self.direction(phase)
        self.b_next[d] += 1
        if zb:
            self.weights.append(Chunk("W", self.b_next[d] - 1, d))
        return Chunk("Bi" if zb else "B", self.b_next[d] - 1, d)

    def forward_backward(self, p0: int, p1: int) -> Chunk:
        f, b = self.forward(p0), self.backward(p1)
        return Chunk("FB", f.mb, f.direction, b.mb, b.direction)

    def order(self) -> list[Chunk]:
        half, hr, ops = self.PP // 2, self.half_rank, []
        ops += [self.forward(0) for _ in range((half - hr - 1) * 2)]  # step 1: nF0
        for _ in range(hr + 1):  # step 2: nF0F1
            ops += [self.forward(0), self.forward(1)]
        for _ in range(half - hr - 1):  # step 3: nB1W1F1 (zero bubble)
            ops.append(self.backward(1, zb=True))
            ops.append(self.weights.popleft())
            ops.append(self.forward(1))
        for i in range(self.m // 2 - self.PP + hr + 1):  # step 4 (main): nF0B1F1B0
            if i == 0 and self.middle:  # not overlapped, to shrink the bubble
                ops += [self.forward(0), self.backward(1)]
            else:
                ops.append(self.forward_backward(0, 1))
            ops.append(self.forward_backward(1, 0))
        for _ in range(half - hr - 1):  # step 5: nB1F1B0
            ops.append(self.backward(1))
            ops.append(self.forward_backward(1, 0))
        zb, steps6 = False, hr + 1
        for i in range(steps6):  # step 6: nB1B0, the second half with zero bubble
            if i == steps6 // 2 and hr % 2 == 1:
                zb = True
            ops.append(self.backward(1, zb))
            if i == steps6 // 2 and hr % 2 == 0:
                zb = True
            ops.append(self.backward(0, zb))
        for _ in range(half - hr - 1):  # step 7: nWB0
            ops.append(self.weights.popleft())
            ops.append(self.backward(0, zb=True))
        while self.weights:  # step 8: nW
            ops.append(self.weights.popleft())
        return ops


def schedule(name: str, stages: int, micro_batches: int) -> list[list[Chunk]]:
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    builders = {"1f1b": one_f_one_b, "zb1p": zero_bubble_h1, "dualpipe": dualpipe}
    if name not in builders:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return builders[name](stages, micro_batches)


# ---- the simulation ----------------------------------------------------------------------------------
def _stage(rank: int, direction: int, stages: int) -> int:
    return rank if direction == 0 else stages - 1 - rank


def _rank(stage: int, direction: int, stages: int) -> int:
    return stage if direction == 0 else stages - 1 - stage


def simulate(name: str, stages: int, micro_batches: int, times: ChunkTimes) -> Timeline:
    """Run schedule ``name`` on ``stages`` ranks and ``micro_batches`` micro-batches with chunk ``times``."""
    order = schedule(name, stages, micro_batches)
    done_f: dict[tuple[int, int, int], float] = {}  # (direction, micro-batch, stage) -> when its output exists
    done_b: dict[tuple[int, int, int], float] = {}  # ... -> when its input gradient exists
    free = [0.0] * stages
    nxt = [0] * stages
    slots: list[list[tuple[Chunk, float, float]]] = [[] for _ in range(stages)]

    def ready(rank: int, chunk: Chunk) -> float | None:
        """When ``chunk``'s inputs are on ``rank`` (None: not yet computed)."""
        needs = []
        parts = [("F", chunk.mb, chunk.direction)] if chunk.kind in ("F", "FB") else []
        if chunk.kind in ("B", "Bi"):
            parts.append(("B", chunk.mb, chunk.direction))
        if chunk.kind == "FB":
            parts.append(("B", chunk.mb2, chunk.direction2))
        for kind, mb, d in parts:
            s = _stage(rank, d, stages)
            if kind == "F" and s > 0:
                needs.append(done_f.get((d, mb, s - 1)))
                needs[-1] = None if needs[-1] is None else needs[-1] + times.comm
            elif kind == "B":
                if s == stages - 1:
                    needs.append(done_f.get((d, mb, s)))
                else:
                    got = done_b.get((d, mb, s + 1))
                    needs.append(None if got is None else got + times.comm)
        if any(n is None for n in needs):
            return None
        return max(needs, default=0.0)

    deferred = name == "zb1p"  # W chunks placed by the simulation (see zero_bubble_h1)
    slack = 1e-9 * (times.F + times.B)  # a W that fits a gap exactly fits, whatever the rounding of the sums
    pending: list[deque[Chunk]] = [deque() for _ in range(stages)]
    in_flight = [0] * stages  # micro-batches whose activations a stage still holds (forward done, W not yet)

    def place(rank: int, chunk: Chunk, at: float) -> None:
        start = max(free[rank], at)
        end = start + times.of(chunk)
        slots[rank].append((chunk, start, end))
        free[rank] = end
        s = _stage(rank, chunk.direction, stages)
        if chunk.kind in ("F", "FB"):
            done_f[(chunk.direction, chunk.mb, s)] = end
            in_flight[rank] += 1
        if chunk.kind in ("B", "Bi"):
            done_b[(chunk.direction, chunk.mb, s)] = end
        if chunk.kind == "FB":
            done_b[(chunk.direction2, chunk.mb2, _stage(rank, chunk.direction2, stages))] = end
        if chunk.kind in ("B", "W"):
            in_flight[rank] -= 1
        if deferred and chunk.kind == "Bi":
            pending[rank].append(Chunk("W", chunk.mb, chunk.direction))

    remaining = sum(len(o) for o in order)
    while remaining:
        progressed = False
        for rank in range(stages):
            while nxt[rank] < len(order[rank]):
                chunk = order[rank][nxt[rank]]
                at = free[rank] if chunk.kind == "W" else ready(rank, chunk)
                if at is None:
                    break
                if deferred:  # fill the wait with postponed W's; keep 1F1B's memory before a forward
                    limit = stages  # 1F1B's peak (stage 0 holds PP micro-batches): later stages have room
                    while pending[rank] and (
                        free[rank] + times.W <= at + slack or (chunk.kind == "F" and in_flight[rank] >= limit)
                    ):
                        place(rank, pending[rank].popleft(), free[rank])
                place(rank, chunk, at)
                nxt[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name!r} deadlocks: every rank waits for another")
    for rank in range(stages):
        while pending[rank]:
            place(rank, pending[rank].popleft(), free[rank])
    makespan = max(free)
    idle = [makespan - sum(end - start for _, start, end in row) for row in slots]
    return Timeline(name, stages, micro_batches, slots, makespan, idle)


def chunk_times(F: float, B: float, W: float, comm_f: float = 0.0, comm_b: float = 0.0, overlap: bool = False,
                p2p: float = 0.0) -> ChunkTimes:  # fmt: skip
    """Chunk times with a chunk's own communication (``comm_f`` in a forward: MoE dispatch + combine;
    ``comm_b`` in a backward) either exposed (added to F and B) or, with ``overlap``, hidden behind the
    other chunk of an overlapped pair (F&B = max(compute of both, communication of both))."""
    if overlap:
        FB = max(F + B, comm_f + comm_b)
        return ChunkTimes(F=F + comm_f, B=B + comm_b, W=W, FB=FB, comm=p2p)
    return ChunkTimes(F=F + comm_f, B=B + comm_b, W=W, FB=F + B + comm_f + comm_b, comm=p2p)


__all__ = [
    "SCHEDULES",
    "Chunk",
    "ChunkTimes",
    "Timeline",
    "bubble_formula",
    "chunk_times",
    "dualpipe",
    "one_f_one_b",
    "schedule",
    "simulate",
    "zero_bubble_h1",
]
