"""Teacher backends. Importing this package registers every built-in backend."""

from edgedistill.teachers import hf  # noqa: F401  (registers "hf")
from edgedistill.teachers.base import Completion, Teacher, build_teacher

__all__ = ["Completion", "Teacher", "build_teacher"]
