"""Pipeline stages. Importing this package registers every stage in REGISTRY."""
from .base import REGISTRY, QA, StageError, StageIO  # noqa: F401
from . import importdata, flagging, calibration, alma, ebs, imaging, reporting  # noqa: F401
from . import outlierflag  # noqa: F401
