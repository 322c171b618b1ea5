"""Transferability estimation (SPEC section 5): sampled decoder features of a bank model on a
target dataset, the estimators (CC-FV, LogME, LEEP, NCE, GBC, TransRate, robustness) and the
ranking evaluation (weighted Kendall tau, Pearson, Spearman, TIS)."""
