"""Label maps: how one N-class label is split into the labels of m small multi-class heads.

A label map is a table ``F`` of shape (m, N): head i predicts ``F[i, y]`` in ``[0, k_i)`` for label ``y``.

- :func:`number_theoretic_map` -- residues ``y mod k_i`` for pairwise-coprime ``k_i`` (a redundant residue number
  system). If the product of any ``r`` moduli is at least N, two labels collide on at most ``r - 1`` heads, so every
  pair of labels is separated by at least ``m - r + 1`` heads (principle 1), and for labels uniform on
  ``[0, prod k_i)`` the residues are independent by the Chinese remainder theorem (principle 2).
- :func:`information_theoretic_map` -- balanced heads (every bucket holds ``floor(N/k)`` or ``ceil(N/k)`` labels,
  so ``H(f_i) = log k_i`` up to rounding) built in blocks that split the joint cells of the block's earlier heads as
  evenly as possible: within a block the joint entropy grows as fast as it can, pairwise mutual information stays
  near 0, and a block whose sizes multiply to at least N identifies every label.
- :func:`mach_map` -- R independent 2-universal hashes ``((a y + b) mod P) mod B`` (MACH, Medini et al. 2019).

:func:`map_report` measures any map: pairwise separation (minimum, exact, and mean), bucket balance and the heads'
pairwise mutual information. :func:`crt` reconstructs labels from residues.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from aloe import AloeError

MERSENNE_31 = (1 << 31) - 1  # prime > any label id; a * y < 2^62 fits int64


@dataclass
class LabelMap:
    """``table[i, y]`` is head i's class for label y; ``sizes[i]`` is head i's number of classes."""

    kind: str
    sizes: list[int]
    table: np.ndarray  # (m, N) int64
    info: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(self.table.shape[1])

    @property
    def n_heads(self) -> int:
        return len(self.sizes)

    @property
    def n_units(self) -> int:
        return int(sum(self.sizes))

    def __post_init__(self) -> None:
        self.table = np.ascontiguousarray(self.table, dtype=np.int64)
        if self.table.ndim != 2 or self.table.shape[0] != len(self.sizes):
            raise ValueError("table must have one row per head")
        for i, k in enumerate(self.sizes):
            row = self.table[i]
            if row.size and (row.min() < 0 or row.max() >= k):
                raise ValueError(f"head {i}: classes must lie in [0, {k})")


# ----------------------------------------------------------------------------------------------- number theory
def _check_classes(n_classes: int) -> None:
    if n_classes < 2:
        raise AloeError(f"need at least 2 classes, got {n_classes}")


def pairwise_coprime(moduli: list[int]) -> bool:
    return all(math.gcd(a, b) == 1 for a, b in itertools.combinations(moduli, 2))


def guaranteed_order(moduli: list[int], n_classes: int) -> int:
    """The smallest r such that the product of ANY r of the moduli is >= N (the r smallest decide it)."""
    prod = 1
    for r, k in enumerate(sorted(moduli), start=1):
        prod *= k
        if prod >= n_classes:
            return r
    raise AloeError(f"moduli {moduli} multiply to {prod} < {n_classes} classes: labels cannot be told apart")


def _int_root_ceil(n: int, r: int) -> int:
    k = max(2, int(round(n ** (1.0 / r))))
    while k**r < n:
        k += 1
    while k > 2 and (k - 1) ** r >= n:
        k -= 1
    return k


def coprime_moduli(n_classes: int, n_units: int, order: int) -> list[int]:
    """Pairwise-coprime moduli, each >= ceil(N^(1/order)), chosen greedily upward while their sum fits n_units."""
    start = _int_root_ceil(n_classes, order)
    chosen: list[int] = []
    total = 0
    k = start
    while True:
        if total + k > n_units:
            break
        if all(math.gcd(k, c) == 1 for c in chosen):
            chosen.append(k)
            total += k
        k += 1
    return chosen


def choose_moduli(n_classes: int, n_units: int, order: int | None = None) -> list[int]:
    """Moduli for ``n_units`` output units. With ``order`` None, the order r (2..) that maximises the guaranteed
    separation ``m - r + 1`` is used (ties: the smaller r, i.e. larger heads)."""
    _check_classes(n_classes)
    orders = [order] if order is not None else list(range(2, max(3, math.ceil(math.log2(n_classes))) + 1))
    best: tuple[int, int, list[int]] | None = None
    for r in orders:
        if r < 1:
            raise AloeError(f"order must be >= 1, got {r}")
        mods = coprime_moduli(n_classes, n_units, r)
        if len(mods) < r:
            continue
        sep = len(mods) - r + 1
        if best is None or sep > best[0]:
            best = (sep, r, mods)
    if best is None:
        need = min_units_number_theoretic(n_classes, order)
        raise AloeError(f"budget of {n_units} output units is too small for a number-theoretic map of "
                        f"{n_classes} classes{'' if order is None else f' of order {order}'} "
                        f"(needs at least {need} units)")
    return best[2]


def min_units_number_theoretic(n_classes: int, order: int | None = None) -> int:
    orders = [order] if order is not None else list(range(2, max(3, math.ceil(math.log2(n_classes))) + 1))
    best = None
    for r in orders:
        start = _int_root_ceil(n_classes, r)
        chosen: list[int] = []
        k = start
        while len(chosen) < r:
            if all(math.gcd(k, c) == 1 for c in chosen):
                chosen.append(k)
            k += 1
        best = sum(chosen) if best is None else min(best, sum(chosen))
    return int(best)


def number_theoretic_map(n_classes: int, moduli: list[int] | None = None, *, n_units: int | None = None,
                         order: int | None = None) -> LabelMap:
    """Residue map ``f_i(y) = y mod k_i`` for pairwise-coprime ``k_i`` (given, or chosen to fit ``n_units``)."""
    _check_classes(n_classes)
    if moduli is None:
        if n_units is None:
            raise ValueError("give moduli or n_units")
        moduli = choose_moduli(n_classes, n_units, order)
    moduli = [int(k) for k in moduli]
    if any(k < 2 for k in moduli):
        raise AloeError(f"moduli must be >= 2, got {moduli}")
    if not pairwise_coprime(moduli):
        raise AloeError(f"moduli {moduli} are not pairwise coprime")
    r = guaranteed_order(moduli, n_classes)
    y = np.arange(n_classes, dtype=np.int64)
    table = np.stack([y % k for k in moduli])
    return LabelMap("number-theoretic", moduli, table,
                    {"order": r, "guaranteed_separation": len(moduli) - r + 1,
                     "correctable_head_errors": (len(moduli) - r) // 2})


def crt(residues: np.ndarray, moduli: list[int]) -> np.ndarray:
    """Chinese remainder reconstruction: the x in ``[0, prod k)`` with ``x = residues[..., j] mod moduli[j]``."""
    residues = np.asarray(residues, dtype=np.int64)
    moduli = [int(k) for k in moduli]
    if residues.shape[-1] != len(moduli):
        raise ValueError("one residue per modulus")
    if not pairwise_coprime(moduli):
        raise ValueError(f"moduli {moduli} are not pairwise coprime")
    big = math.prod(moduli)
    # x = sum_j a_j * e_j (mod M) with e_j = (M/k_j) * inv(M/k_j mod k_j): e_j = 1 mod k_j, 0 mod the others
    coefs = [(big // k) * pow((big // k) % k, -1, k) % big for k in moduli]
    if big * max(moduli) < (1 << 62):
        out = np.zeros(residues.shape[:-1], dtype=np.int64)
        for j, (k, e) in enumerate(zip(moduli, coefs)):
            out = (out + (residues[..., j] % k) * e) % big
        return out
    out = np.zeros(residues.shape[:-1], dtype=object)  # exact Python integers when int64 would overflow
    for j, (k, e) in enumerate(zip(moduli, coefs)):
        out = (out + (residues[..., j] % k).astype(object) * e) % big
    return out


# ------------------------------------------------------------------------------------------ information theory
def information_theoretic_map(n_classes: int, sizes: list[int], *, weights: np.ndarray | None = None,
                              seed: int = 0, exact_labels: int = 50_000) -> LabelMap:
    """Balanced, near-independent heads of the given sizes under the label distribution ``weights``.

    Heads are grouped in consecutive blocks; a block ends once it tells every label apart (its sizes multiply to
    at least N). Head i is built from the heads before it. Labels are taken heaviest first in rounds of k_i and
    each round puts exactly one label in every bucket, so buckets hold equal label counts (floor/ceil(N/k_i))
    and, because a round holds labels of similar probability, nearly equal probability mass: H(f_i(Y)) ~ log k_i.
    Inside a round, labels are matched to buckets by linear assignment: first so that labels sharing a joint cell
    of the block's earlier heads go to different buckets (which drives the block towards telling all labels
    apart), then to minimise the growth of ``sum_j sum_ab J_ij(a, b)^2``, the squared joint masses with every
    earlier head j (flat joints mean pairwise mutual information near 0). For N above ``exact_labels`` the
    assignment is replaced by dealing the labels round-robin in the order of their joint cell (cells and labels
    inside a cell in random order): still exactly balanced, and every joint cell spread evenly.
    """
    from scipy.optimize import linear_sum_assignment

    _check_classes(n_classes)
    sizes = [int(k) for k in sizes]
    if any(k < 2 for k in sizes):
        raise AloeError(f"head sizes must be >= 2, got {sizes}")
    if sum(math.log(k) for k in sizes) < math.log(n_classes) - 1e-12:
        raise AloeError(f"head sizes {sizes} multiply to less than {n_classes}: labels cannot be told apart")
    if weights is None:
        w = np.full(n_classes, 1.0 / n_classes)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_classes,) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
            raise AloeError("label weights must be N finite non-negative numbers with a positive sum")
        w = w / w.sum()
    rng = np.random.default_rng(seed)
    order_all = np.lexsort((rng.random(n_classes), -w))  # heaviest first, random among equals
    table = np.empty((len(sizes), n_classes), dtype=np.int64)
    cell = np.zeros(n_classes, dtype=np.int64)
    n_cells = 1
    for i, k in enumerate(sizes):
        if n_cells >= n_classes:  # the block so far identifies every label: start a new block
            cell[:] = 0
            n_cells = 1
        head = np.empty(n_classes, dtype=np.int64)
        if n_classes <= exact_labels and i > 0:
            # linear assignment, round by round: first keep the block's joint cells apart (dominant term),
            # then flatten the joints with every earlier head
            joints = [np.zeros((sizes[j], k)) for j in range(i)]
            cell_count = np.zeros((n_cells, k), dtype=np.int32)
            for start in range(0, n_classes, k):
                labels = order_all[start:start + k]
                cost = np.zeros((labels.size, k))
                for j in range(i):
                    cost += joints[j][table[j, labels]]
                cost = cost * w[labels][:, None]
                cost = cost / (cost.max() + 1e-300) + cell_count[cell[labels]] * 2.0 + 1e-9 * rng.random(cost.shape)
                _, buckets = linear_sum_assignment(cost)
                head[labels] = buckets
                cell_count[cell[labels], buckets] += 1
                for j in range(i):
                    np.add.at(joints[j], (table[j, labels], buckets), w[labels])
        else:
            # round-robin in the order of the joint cells (random cell order, random order inside a cell)
            cell_rank = rng.permutation(n_cells)[cell]
            order = np.lexsort((rng.random(n_classes), cell_rank))
            head[order] = np.arange(n_classes) % k
        table[i] = head
        cell = cell * k + head
        _, cell = np.unique(cell, return_inverse=True)
        n_cells = int(cell.max()) + 1
    return LabelMap("information-theoretic", sizes, table,
                    {"seed": seed, "weighted": weights is not None, "exact_labels": exact_labels})


def mach_map(n_classes: int, n_buckets: int, n_repetitions: int, *, seed: int = 0) -> LabelMap:
    """MACH: ``h_j(y) = ((a_j y + b_j) mod P) mod B`` with P = 2^31 - 1 and random a_j != 0, b_j."""
    _check_classes(n_classes)
    if n_buckets < 2 or n_repetitions < 1:
        raise AloeError(f"MACH needs B >= 2 buckets and R >= 1 repetitions, got B={n_buckets}, R={n_repetitions}")
    if n_repetitions * math.log(n_buckets) < math.log(n_classes) - 1e-12:
        raise AloeError(f"MACH with B={n_buckets}, R={n_repetitions} has fewer than {n_classes} bucket tuples")
    if n_classes >= MERSENNE_31:
        raise AloeError(f"MACH hashing supports fewer than {MERSENNE_31} classes")
    rng = np.random.default_rng(seed)
    y = np.arange(n_classes, dtype=np.int64)
    rows = []
    for _ in range(n_repetitions):
        a = int(rng.integers(1, MERSENNE_31))
        b = int(rng.integers(0, MERSENNE_31))
        rows.append(((y * a + b) % MERSENNE_31) % n_buckets)
    return LabelMap("mach", [n_buckets] * n_repetitions, np.stack(rows), {"seed": seed, "hash": "2-universal"})


# ------------------------------------------------------------------------------------------------------ report
def _pair_collision_exists(table: np.ndarray, heads: tuple[int, ...], sizes: list[int]) -> bool:
    key = np.zeros(table.shape[1], dtype=np.int64)
    for h in heads:
        key = key * sizes[h] + table[h]
    return np.unique(key).size < key.size


def map_report(lmap: LabelMap, *, weights: np.ndarray | None = None, max_work: int = 200_000_000) -> dict:
    """Separation and independence of a label map.

    - ``min_separation``: the fewest heads separating any two labels, exact: ``m - A`` where A is the largest number
      of heads on which some pair collides (found by checking subsets of heads of growing size; ``null`` with
      ``min_separation_lower_bound`` when that would cost more than ``max_work`` label visits);
    - ``mean_separation``: the mean over all label pairs of the number of separating heads (exact, from bucket
      counts);
    - ``mutual_information``: I(f_i; f_j) in nats for every pair of heads, under the label distribution
      ``weights`` (uniform by default); its max and mean; ``balance``: H(f_i) / log k_i per head.
    """
    table, sizes = lmap.table, lmap.sizes
    m, n = table.shape
    p = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    # mean separation over unordered pairs: sum_i P(pair differs on head i)
    mean_sep = 0.0
    entropies = []
    largest_bucket = []
    for i, k in enumerate(sizes):
        counts = np.bincount(table[i], minlength=k).astype(np.float64)
        mean_sep += 1.0 - float(np.sum(counts * (counts - 1.0))) / (n * (n - 1.0))
        q = np.bincount(table[i], weights=p, minlength=k)
        q = q[q > 0]
        entropies.append(float(-(q * np.log(q)).sum()))
        largest_bucket.append(float(counts.max() / (n / k)))
    # exact minimum separation
    max_agree = 0
    work = 0
    exact = True
    for t in range(1, m + 1):
        found = False
        for heads in itertools.combinations(range(m), t):
            work += n * t
            if work > max_work:
                exact = False
                break
            if _pair_collision_exists(table, heads, sizes):
                found = True
                break
        if not exact:
            break
        if not found:
            break
        max_agree = t
    mi = np.zeros((m, m))
    for i, j in itertools.combinations(range(m), 2):
        joint = np.bincount(table[i] * sizes[j] + table[j], weights=p, minlength=sizes[i] * sizes[j])
        joint = joint.reshape(sizes[i], sizes[j])
        pi, pj = joint.sum(1), joint.sum(0)
        nz = joint > 0
        val = float((joint[nz] * (np.log(joint[nz]) - np.log(np.outer(pi, pj)[nz]))).sum())
        mi[i, j] = mi[j, i] = max(val, 0.0)
    upper = mi[np.triu_indices(m, 1)]
    report = {
        "kind": lmap.kind,
        "n_classes": n,
        "n_heads": m,
        "sizes": list(sizes),
        "n_units": lmap.n_units,
        "min_separation": (m - max_agree) if exact else None,
        "mean_separation": mean_sep,
        "balance": [e / math.log(k) for e, k in zip(entropies, sizes)],
        "largest_bucket_over_mean": largest_bucket,
        "mutual_information": mi.tolist(),
        "max_mutual_information": float(upper.max()) if upper.size else 0.0,
        "mean_mutual_information": float(upper.mean()) if upper.size else 0.0,
    }
    if not exact:
        # collisions were found on max_agree heads; larger subsets were not all checked
        report["min_separation_upper_bound"] = m - max_agree
        if "guaranteed_separation" in lmap.info:
            report["min_separation_lower_bound"] = lmap.info["guaranteed_separation"]
    return report
