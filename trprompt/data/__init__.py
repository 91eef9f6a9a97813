"""Tasks: built-in benchmarks and users' files, :class:`Problem` records and seeded splits."""

from trprompt.data.datasets import DATASETS, SPLITS, Problem, load_split, split_sizes
from trprompt.data.tasks import (
    BUILTIN_TASKS,
    DATASET_GRADERS,
    DatasetError,
    Fields,
    Task,
    TaskSpec,
    grade_problem,
    load_task,
    task_from_config,
)

__all__ = [
    "BUILTIN_TASKS",
    "DATASETS",
    "DATASET_GRADERS",
    "SPLITS",
    "DatasetError",
    "Fields",
    "Problem",
    "Task",
    "TaskSpec",
    "grade_problem",
    "load_split",
    "load_task",
    "split_sizes",
    "task_from_config",
]
