"""Empirical privacy auditing: membership inference and one-run canary audits.

An audit can only show that a training run is LESS private than claimed (a
lower bound on epsilon above the accountant's epsilon means a bug); it can
never certify privacy. See docs/AUDITING.md for how to read the numbers.
"""

# The documented API (docs/AUDITING.md); the building blocks (roc_curve, tpr_at_fpr, advantage,
# Clopper-Pearson bounds, ...) stay in the submodules, and the ROC AUC is dpjax.metrics.roc_auc.
from dpjax.audit.membership import (
    audit_membership_from_losses,
    epsilon_from_rates,
    epsilon_lower_bound,
    membership_inference,
    split_epsilon_lower_bound,
)
from dpjax.audit.one_run import (
    audit_from_scores,
    canary_inclusion,
    dirac_canary_scores,
    guesses_from_scores,
    guesses_needed,
    max_lower_bound,
    one_run_lower_bound,
    one_run_p_value,
)

__all__ = [
    'audit_from_scores',
    'audit_membership_from_losses',
    'canary_inclusion',
    'dirac_canary_scores',
    'epsilon_from_rates',
    'epsilon_lower_bound',
    'guesses_from_scores',
    'guesses_needed',
    'max_lower_bound',
    'membership_inference',
    'one_run_lower_bound',
    'one_run_p_value',
    'split_epsilon_lower_bound',
]
