"""Diagnostic statistics of the reader study, shared by the server, the clients and ``fedmammo stats``.

    from common.stats import auc_ci, delong_test
    auc, lo, hi = auc_ci(y_true, y_score)            # DeLong 95% CI, as pROC / SPSS
    z, p = delong_test(y_true, y_score_a, y_score_b)  # paired, same cases

Modules: ``delong`` (AUC, DeLong variance/CI/tests), ``binary`` (Wilson CIs, McNemar, kappa and weighted
kappa, from cases or from contingency tables), ``scores``
(score kinds, thresholds, grids), ``federated`` (site summaries and their pooling), ``analysis`` (the
study's tables), ``report`` (JSON/Markdown/CSV/PNG), ``command`` (``fedmammo stats``).
"""

from common.stats._validation import StatsInputError
from common.stats.analysis import analyze, subgroup_labels
from common.stats.binary import (
    Kappa,
    McNemar,
    Proportion,
    binary_metrics,
    cohen_kappa,
    mcnemar_tests,
    weighted_kappa,
    wilson,
)
from common.stats.delong import auc_ci, delong_cov, delong_test, delong_test_unpaired, roc_auc
from common.stats.federated import pool_histograms, pooled_analysis, site_histograms, site_placement_sums
from common.stats.scores import GRIDS, Grid, RaterScores, ScoreKind

__all__ = [
    "GRIDS",
    "Grid",
    "Kappa",
    "McNemar",
    "Proportion",
    "RaterScores",
    "ScoreKind",
    "StatsInputError",
    "analyze",
    "auc_ci",
    "binary_metrics",
    "cohen_kappa",
    "delong_cov",
    "delong_test",
    "delong_test_unpaired",
    "mcnemar_tests",
    "pool_histograms",
    "pooled_analysis",
    "roc_auc",
    "site_histograms",
    "site_placement_sums",
    "subgroup_labels",
    "weighted_kappa",
    "wilson",
]
