"""Tasks: YAML-defined datasets and prompts, rubric scoring, seeded sampling, and metrics.

Example:
    >>> task = load_task("sst2")
    >>> data = task.get_data(n_train=1000, n_dev=500, n_eval=1000, seed=0)
    >>> compute_metric(task.metric, predictions, data.eval)
"""
from zoft.tasks.example import Example, TaskData
from zoft.tasks.metrics import METRICS, compute_metric
from zoft.tasks.readers import using_data_dir
from zoft.tasks.registry import load_task
from zoft.tasks.task import Task, list_tasks

__all__ = ["Task", "Example", "TaskData", "load_task", "list_tasks", "compute_metric", "METRICS", "using_data_dir"]
