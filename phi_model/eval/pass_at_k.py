"""The unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models
Trained on Code", section 2.1: with n samples of a problem of which c pass,

    pass@k = E[1 - C(n - c, k) / C(n, k)]

computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the huge binomials."""
from __future__ import annotations

import numbers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated probability that at least one of k samples (out of n drawn, c correct) passes."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"pass_at_k: {name} must be an int, got {v!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every choice of k samples holds a correct one
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """pass@k over problems: the mean of pass_at_k(n, c, k) for each problem's (n, c)."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem's (n, c)")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
