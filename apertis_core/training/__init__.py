"""Training: run configs, planning (steps, memory, ETA), the loop with exact resume and DDP, callbacks.

from apertis_core.training import RunConfig, plan_run, train, ProgressBar
run = RunConfig.load("run.yaml", ["train.lr=1e-3"])
print(plan_run(run).to_text())
result = train(run, callbacks=[ProgressBar()])
"""

from .callbacks import Callback, CallbackList, JsonlLogger, ProgressBar, TrainState, read_metrics
from .checkpoint import best_checkpoint, latest_checkpoint, list_checkpoints
from .config import RunConfig, TrainConfig
from .planning import TrainPlan, plan_run
from .trainer import STOP_FILE, TrainResult, train

__all__ = [
    "Callback",
    "CallbackList",
    "JsonlLogger",
    "ProgressBar",
    "RunConfig",
    "STOP_FILE",
    "TrainConfig",
    "TrainPlan",
    "TrainResult",
    "TrainState",
    "best_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "plan_run",
    "read_metrics",
    "train",
]
