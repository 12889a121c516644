"""Training: run configs, planning (steps, memory, ETA), the loop with exact resume and DDP, callbacks.

from apertis_core.training import RunConfig, plan_run, train, ProgressBar
run = RunConfig.load("run.yaml", ["train.lr=1e-3"])
print(plan_run(run).to_text())
result = train(run, callbacks=[ProgressBar()])

Names load on first use (see ..lazy): RunConfig and STOP_FILE import without torch.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "Callback": ".callbacks",
    "CallbackList": ".callbacks",
    "JsonlLogger": ".callbacks",
    "ProgressBar": ".callbacks",
    "RunConfig": ".config",
    "STOP_FILE": "..filenames",
    "TrainConfig": ".config",
    "TrainPlan": ".planning",
    "TrainResult": ".trainer",
    "TrainState": ".callbacks",
    "best_checkpoint": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "list_checkpoints": ".checkpoint",
    "plan_run": ".planning",
    "read_metrics": ".callbacks",
    "train": ".trainer",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
