"""Teacher backends. Importing this package registers every built-in backend."""

from edgedistill.models.hf import Completion
from edgedistill.teachers import hf, llamacpp, openai_compat  # noqa: F401  (registers the backends
from edgedistill.teachers.base import (
    Sampling,
    Teacher,
    Usage,
    build_teacher,
    register_backend,
)

__all__ = ["Completion", "Sampling", "Teacher", "Usage", "build_teacher", "register_backend"]
