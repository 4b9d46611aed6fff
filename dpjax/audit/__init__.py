"""Empirical privacy auditing: membership inference and one-run canary audits.

An audit can only show that a training run is LESS private than claimed (a
lower bound on epsilon above the accountant's epsilon means a bug); it can
never certify privacy. See docs/AUDITING.md for how to read the numbers.
"""

from dpjax.audit.membership import (
    advantage,
    attack_metrics,
    audit_membership_from_losses,
    auc,
    class_calibrated_scores,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
    membership_inference,
    roc_curve,
    split_epsilon_lower_bound,
    tpr_at_fpr,
)
from dpjax.audit.one_run import (
    audit_from_scores,
    canary_inclusion,
    dirac_canary_scores,
    guesses_from_scores,
    one_run_lower_bound,
    one_run_p_value,
)
