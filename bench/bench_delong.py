"""Paired DeLong test for two raters vs scikit-learn's roc_auc_score for the same two AUCs.

    python bench/bench_delong.py

Prints a Markdown table: seconds for ``delong_test`` (both AUCs, their variances and covariance, Z, p)
and for two ``roc_auc_score`` calls on the same data, best of several runs, and their ratio.
Target: 10^6 cases in under 1 s and within 3× of roc_auc_score.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from common.stats import delong_cov, delong_test


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}, best of 5 (10^6: of 3)\n")
    print("| cases | delong_test (s) | 2 × roc_auc_score (s) | ratio |")
    print("|---:|---:|---:|---:|")
    for exponent in (4, 5, 6):
        n = 10**exponent
        y = rng.random(n) < 0.3
        model = np.round(np.clip(50 + 15 * y + rng.normal(0, 20, n), 0, 100), 1)  # 0–100, one decimal: ties
        reader = rng.normal(0, 1, n) + 0.8 * y  # continuous, no ties
        auc, _ = delong_cov(y, model, reader)
        assert np.allclose(auc, [roc_auc_score(y, model), roc_auc_score(y, reader)], atol=1e-12)
        repeats = 3 if exponent == 6 else 5
        ours = best_of(repeats, lambda y=y, a=model, b=reader: delong_test(y, a, b))
        theirs = best_of(repeats, lambda y=y, a=model, b=reader: (roc_auc_score(y, a), roc_auc_score(y, b)))
        print(f"| 10^{exponent} | {ours:.4f} | {theirs:.4f} | {ours / theirs:.2f}× |")


if __name__ == "__main__":
    main()
