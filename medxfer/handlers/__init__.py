"""Ignite/MONAI handlers used by the medxfer bundles."""

from medxfer.handlers.bank_saver import BankCheckpointer
from medxfer.handlers.checkpoints import AtomicCheckpointSaver, FallbackModelSaver
from medxfer.handlers.finite_loss import NonFiniteLossError, StopOnNonFiniteLoss
from medxfer.handlers.history import MetricHistory
from medxfer.handlers.metrics_writer import SegmentationMetricsWriter
from medxfer.handlers.robustness_stopping import RobustnessEarlyStopping
from medxfer.handlers.resume import (BestMetricState, RandomStates, ResumableCheckpointSaver, ResumeFromLatest,
                                     latest_checkpoint)
from medxfer.handlers.timing import StepTimer

__all__ = ["AtomicCheckpointSaver", "FallbackModelSaver", "BestMetricState", "RandomStates", "BankCheckpointer", "NonFiniteLossError", "StopOnNonFiniteLoss", "MetricHistory", "RobustnessEarlyStopping", "SegmentationMetricsWriter", "ResumeFromLatest", "ResumableCheckpointSaver", "latest_checkpoint", "StepTimer"]
