"""Teacher backends. Importing this package registers every built-in backend."""

from edgedistill.teachers import hf  # noqa: F401  (registers "hf")
from edgedistill.teachers.base import Completion, Sampling, Teacher, build_teacher, register_backend

__all__ = ["Completion", "Sampling", "Teacher", "build_teacher", "register_backend"]
