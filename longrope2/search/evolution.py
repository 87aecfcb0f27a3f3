"""LongRoPE2's evolutionary search over critical dims and rescale factors (paper Alg. 1-2).

An individual is a real critical dimension ``d_rcd`` plus the searched factors of pairs
``d_rcd .. dim/2 - 1`` (non-decreasing, in ``[s, 2s]``, on a grid); pairs below ``d_rcd`` get the
NTK-style fill ``lambda_rcd ** (i / d_rcd)``. Everything here is a pure function of its inputs
and a numpy ``Generator``; scoring is the caller's (``search.pool``), so the algorithm is tested
with a fake scorer and the distributed pool only sends candidates out and scores back.

Defaults follow the paper and microsoft/LongRoPE: population 64, 40 iterations, top-32 parents,
16 mutants and 16 crossovers per iteration (64 + 40 x 32 = 1,344 evaluations), mutation
probability 0.3, a 0.01 grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longrope2.rope.factors import longrope2_factors


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    dim: int
    """Rotary dim (pairs = dim / 2)."""
    base: float
    original_length: int
    target_length: int
    min_critical_dim: int
    """Lowest candidate d_rcd: the ten-period dim d10."""
    max_critical_dim: int
    """Highest candidate d_rcd: the theoretical critical dim d_tcd."""
    grid: float = 0.01

    def __post_init__(self) -> None:
        if self.target_length <= self.original_length:
            raise ValueError(f"target length {self.target_length} must exceed the window {self.original_length}")
        if not 0 < self.min_critical_dim <= self.max_critical_dim < self.dim // 2:
            raise ValueError(
                f"critical dim range [{self.min_critical_dim}, {self.max_critical_dim}] must lie in "
                f"[1, {self.dim // 2 - 1}]"
            )
        if self.grid <= 0:
            raise ValueError(f"grid must be positive, got {self.grid}")

    @property
    def scale(self) -> float:
        return self.target_length / self.original_length

    @property
    def half(self) -> int:
        return self.dim // 2

    @property
    def grid_lo(self) -> int:
        """``s`` in grid steps, rounded up so that every grid value is >= s."""
        return math.ceil(self.scale / self.grid - 1e-9)

    @property
    def grid_hi(self) -> int:
        return math.floor(2 * self.scale / self.grid + 1e-9)

    @property
    def critical_dims(self) -> list[int]:
        """Every candidate d_rcd, ``d10 .. d_tcd``."""
        return list(range(self.min_critical_dim, self.max_critical_dim + 1))

    def check_population(self, size: int) -> None:
        """The initial population seeds every d_rcd at least once, so it needs one per value."""
        dims = self.critical_dims
        if size < len(dims):
            raise ValueError(f"evolution.population_size {size} cannot seed every critical dim d_rcd in "
                             f"[{dims[0]}, {dims[-1]}] ({len(dims)} values): use population_size >= {len(dims)}")


@dataclass(frozen=True)
class Candidate:
    """A point of the search space; ``upper`` holds grid steps (ints) so equality is exact."""

    critical_dim: int
    upper: tuple[int, ...]

    def factors(self, space: SearchSpace) -> list[float]:
        """The full per-pair factor vector (length dim / 2)."""
        values = [round(u * space.grid, 10) for u in self.upper]
        return longrope2_factors(space.dim, space.base, space.original_length, space.target_length,
                                 self.critical_dim, values).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"critical_dim": self.critical_dim, "upper": list(self.upper)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(int(data["critical_dim"]), tuple(int(u) for u in data["upper"]))


def _check(candidate: Candidate, space: SearchSpace) -> Candidate:
    upper = candidate.upper
    assert len(upper) == space.half - candidate.critical_dim, "upper factors must cover pairs d_rcd..dim/2-1"
    assert all(a <= b for a, b in zip(upper, upper[1:])), "factors must be non-decreasing"
    assert space.grid_lo <= upper[0] and upper[-1] <= space.grid_hi, "factors must lie in [s, 2s]"
    return candidate


def initial_population(space: SearchSpace, size: int, rng: np.random.Generator) -> list[Candidate]:
    """One flat individual per candidate d_rcd in ``[d10, d_tcd]`` (a random level s' in
    ``[s, 2s]`` above it), then more flat individuals cycling through the d_rcd range until
    ``size`` distinct ones exist (paper Alg. 1, line 1). A population smaller than the d_rcd
    range is an error (``check_population``): every d_rcd is seeded."""
    space.check_population(size)
    dims = space.critical_dims
    levels = space.grid_hi - space.grid_lo + 1
    capacity = len(dims) * levels
    if size > capacity:
        raise ValueError(f"population {size} exceeds the {capacity} distinct flat individuals of this space")
    population: list[Candidate] = []
    seen: set[Candidate] = set()
    i = 0
    while len(population) < size:
        crit = dims[i % len(dims)]
        level = int(rng.integers(space.grid_lo, space.grid_hi + 1))
        candidate = Candidate(crit, (level,) * (space.half - crit))
        if candidate not in seen:
            seen.add(candidate)
            population.append(_check(candidate, space))
        i += 1
    return population


def mutate(parent: Candidate, space: SearchSpace, rng: np.random.Generator, probability: float,
           operator: str = "step", max_step: float = 0.2) -> Candidate:
    """Move d_rcd by one with ``probability``, then change each searched factor with
    ``probability``; the result stays on the grid, inside ``[s, 2s]`` and non-decreasing.

    ``step`` (default): the factor moves by a random non-zero number of grid steps, at most
    ``max_step`` of the ``[s, 2s]`` span, clipped to ``[s, 2s]``; then the monotone repair: the
    moved factor keeps its new value, factors on its left above it come down to it and factors
    on its right below it go up to it. ``neighbour`` (the earlier operator, kept to compare): the
    factor is redrawn between its neighbours' values, so flat individuals never change inside.
    """
    crit, upper = parent.critical_dim, list(parent.upper)
    if rng.random() < probability:
        step = int(rng.choice([-1, 1]))
        new_crit = min(max(crit + step, space.min_critical_dim), space.max_critical_dim)
        if new_crit < crit:
            upper = [upper[0]] * (crit - new_crit) + upper  # the new searched pair starts level with the old first
        elif new_crit > crit:
            upper = upper[new_crit - crit:]
        crit = new_crit
    reach = max(1, round(max_step * (space.grid_hi - space.grid_lo)))
    for j in range(len(upper)):
        if rng.random() >= probability:
            continue
        if operator == "neighbour":
            lo = upper[j - 1] if j > 0 else space.grid_lo
            hi = upper[j + 1] if j + 1 < len(upper) else space.grid_hi
            upper[j] = int(rng.integers(lo, hi + 1))
            continue
        step = int(rng.integers(1, reach + 1)) * (1 if rng.random() < 0.5 else -1)
        value = min(max(upper[j] + step, space.grid_lo), space.grid_hi)
        upper[j] = value
        for i in range(j):  # monotone repair around the moved factor
            upper[i] = min(upper[i], value)
        for i in range(j + 1, len(upper)):
            upper[i] = max(upper[i], value)
    return _check(Candidate(crit, tuple(upper)), space)


def crossover(a: Candidate, b: Candidate, space: SearchSpace, rng: np.random.Generator) -> Candidate:
    """Child takes d_rcd from a random parent and each searched pair's factor from either
    parent (where the other has none, from the one that has it), then is made non-decreasing
    by a running maximum."""
    crit = a.critical_dim if rng.random() < 0.5 else b.critical_dim
    full_a = dict(zip(range(a.critical_dim, space.half), a.upper))
    full_b = dict(zip(range(b.critical_dim, space.half), b.upper))
    upper = []
    for pair in range(crit, space.half):
        options = [v for v in (full_a.get(pair), full_b.get(pair)) if v is not None]
        upper.append(options[int(rng.integers(len(options)))])
    upper = np.maximum.accumulate(np.asarray(upper)).tolist()
    return _check(Candidate(crit, tuple(int(u) for u in upper)), space)


@dataclass(kw_only=True)
class EvolutionConfig:
    population_size: int = 64
    """Initial population (paper: 64)."""
    iterations: int = 40
    parents: int = 32
    """Top-k individuals kept each generation and bred from."""
    mutants: int = 16
    crossovers: int = 16
    mutation_probability: float = 0.3
    operators: str = "step"
    """``step`` (bounded random steps + monotone repair) or ``neighbour`` (redraw between the
    neighbours' values; moves nothing inside flat individuals): see ``mutate``."""
    mutation_step: float = 0.2
    """``step``: the largest move, as a fraction of the ``[s, 2s]`` span."""
    seed: int = 0
    max_tries: int = 1000
    """Draws allowed per new child before giving up on finding an unseen one."""

    def __post_init__(self) -> None:
        for name in ("population_size", "parents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.iterations < 0 or self.mutants < 0 or self.crossovers < 0:
            raise ValueError("iterations, mutants and crossovers must be >= 0")
        if not 0 < self.mutation_probability <= 1:
            raise ValueError(f"mutation_probability must be in (0, 1], got {self.mutation_probability}")
        if self.operators not in ("step", "neighbour"):
            raise ValueError(f"operators must be 'step' or 'neighbour', got {self.operators!r}")
        if not 0 < self.mutation_step <= 1:
            raise ValueError(f"mutation_step must be in (0, 1], got {self.mutation_step}")


@dataclass
class SearchState:
    """Everything needed to resume: written after every generation."""

    generation: int = 0
    """Generations finished; 0 = the initial population is being scored."""
    scores: dict[Candidate, float] = field(default_factory=dict)
    """Every candidate scored on every document (with ``partial``, the duplicate filter)."""
    partial: dict[Candidate, list[float]] = field(default_factory=dict)
    """Per-document answer NLL of every candidate the caller scored document by document
    (``search.halving``); one that stopped at a rung has fewer entries and no ``scores`` entry."""
    scored_in: dict[Candidate, int] = field(default_factory=dict)
    """The generation each candidate was scored (or stopped) in."""
    population: list[Candidate] = field(default_factory=list)
    """The current parents (top-k), best first."""
    best_per_generation: list[float] = field(default_factory=list)
    rng_state: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "scored": [{**c.to_dict(), "score": s, "generation": self.scored_in[c]} for c, s in self.scores.items()],
            "partial": [{**c.to_dict(), "nll": nll, "generation": self.scored_in[c]} for c, nll in self.partial.items()],
            "population": [c.to_dict() for c in self.population],
            "best_per_generation": self.best_per_generation,
            "rng_state": self.rng_state,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchState":
        return cls(
            generation=int(data["generation"]),
            scores={Candidate.from_dict(d): float(d["score"]) for d in data["scored"]},
            partial={Candidate.from_dict(d): [float(x) for x in d["nll"]] for d in data.get("partial", [])},
            scored_in={Candidate.from_dict(d): int(d["generation"]) for d in (*data["scored"], *data.get("partial", []))},
            population=[Candidate.from_dict(d) for d in data["population"]],
            best_per_generation=[float(x) for x in data["best_per_generation"]],
            rng_state=data["rng_state"],
        )


def _rng(state: SearchState, config: EvolutionConfig) -> np.random.Generator:
    rng = np.random.default_rng(config.seed)
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state
    return rng


def propose(state: SearchState, space: SearchSpace, config: EvolutionConfig) -> list[Candidate]:
    """The candidates to score for the next generation (none seen before). Pure: the RNG
    position travels in the returned state via ``advance``."""
    rng = _rng(state, config)
    if state.generation == 0 and not state.population:
        children = initial_population(space, config.population_size, rng)
    else:
        children = _breed(state, space, config, rng)
    state.rng_state = rng.bit_generator.state
    return children


def _breed(state: SearchState, space: SearchSpace, config: EvolutionConfig, rng: np.random.Generator) -> list[Candidate]:
    parents = state.population
    children: list[Candidate] = []
    seen = set(state.scores) | set(state.partial)

    def add(make) -> None:
        for _ in range(config.max_tries):
            child = make()
            if child not in seen:
                seen.add(child)
                children.append(child)
                return
        # the neighbourhood of these parents is exhausted; fewer children this generation

    for _ in range(config.mutants):
        add(lambda: mutate(parents[int(rng.integers(len(parents)))], space, rng, config.mutation_probability,
                           config.operators, config.mutation_step))
    if len(parents) >= 2:
        for _ in range(config.crossovers):
            def make():
                i, j = rng.choice(len(parents), size=2, replace=False)
                return crossover(parents[int(i)], parents[int(j)], space, rng)
            add(make)
    return children


def advance(state: SearchState, scored: dict[Candidate, float], config: EvolutionConfig,
            partial: dict[Candidate, list[float]] | None = None) -> SearchState:
    """Record a generation's scores and keep the top-k (lower needle-PPL is better; ties broken
    by the candidate's order so that the result does not depend on scoring order). ``partial``:
    the generation's per-document NLLs, including candidates that stopped early (not in
    ``scored``, never parents)."""
    for candidate, nll in (partial or {}).items():
        state.partial[candidate] = list(nll)
        state.scored_in[candidate] = state.generation
    for candidate, score in scored.items():
        if not math.isfinite(score):
            score = math.inf
        state.scores[candidate] = score
        state.scored_in[candidate] = state.generation
    pool = set(state.population) | set(scored)
    ranked = sorted(pool, key=lambda c: (state.scores[c], c.critical_dim, c.upper))
    state.population = ranked[: config.parents]
    state.best_per_generation.append(state.scores[ranked[0]])
    state.generation += 1
    return state


def best(state: SearchState) -> tuple[Candidate, float]:
    candidate = min(state.scores, key=lambda c: (state.scores[c], c.critical_dim, c.upper))
    return candidate, state.scores[candidate]


def run_serial(space: SearchSpace, config: EvolutionConfig, score_fn, state: SearchState | None = None,
               on_generation=None) -> SearchState:
    """The whole search in one process: ``score_fn(list[Candidate]) -> list[float]``."""
    state = state or SearchState()
    while state.generation <= config.iterations:
        candidates = propose(state, space, config)
        scores = score_fn(candidates) if candidates else []
        advance(state, dict(zip(candidates, scores)), config)
        if on_generation is not None:
            on_generation(state)
    return state

