"""Dataset planning with nnU-Net v2 (target spacing, patch size, normalisation) for the bundles."""

from .nnunet import load_plans, plan_task, plans_from_nnunet

__all__ = ["plan_task", "plans_from_nnunet", "load_plans"]
