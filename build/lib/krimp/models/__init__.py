"""Loading models and the task adapters that know how to feed them."""

from krimp.models.handle import ModelHandle
from krimp.models.loader import load_model
from krimp.models.tasks import TASKS, Task, make_task

__all__ = ["TASKS", "ModelHandle", "Task", "load_model", "make_task"]
