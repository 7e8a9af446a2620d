"""Training tasks: one `keras.Model` per objective, each owning its loss in `compute_loss`."""

from tfmir.tasks.distillation import Distillation
from tfmir.tasks.metric_learning import MetricLearning
from tfmir.tasks.task import FIELDS, SAMPLERS, Task

# config task name -> task class (each has `from_task_config(model, args, splits)`)
TASKS = {
    "metric_learning": MetricLearning,
    "distillation": Distillation,
}


def build_task(config, splits: dict) -> Task:
    """The task of `config.task` (a `tfmir.configs.TaskConfig`) for the data in `splits`.

    Raises:
        ValueError: an unknown task name, or arguments the task does not take.
    """
    name = config.name
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}. Received: task={name!r}")
    return TASKS[name].from_task_config(dict(config.model), dict(config.args), splits)


__all__ = ["Distillation", "FIELDS", "MetricLearning", "SAMPLERS", "TASKS", "Task", "build_task"]
