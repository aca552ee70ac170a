"""Noise schedules of the image part, one interface (``base.Schedule``): DDPM (``ddpm``, the paper's) and rectified
flow (``flow``), chosen by the model option ``objective``."""

from transfusion.schedules.base import CLEAN, FULL, Schedule, randn
from transfusion.schedules.ddpm import DDPM
from transfusion.schedules.flow import RectifiedFlow

OBJECTIVES: dict[str, type[Schedule]] = {cls.OBJECTIVE: cls for cls in (DDPM, RectifiedFlow)}


def schedule_class(objective: str) -> type[Schedule]:
    """The schedule of an ``objective``, or a ValueError naming the choices."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    return OBJECTIVES[objective]


__all__ = ["CLEAN", "DDPM", "FULL", "OBJECTIVES", "RectifiedFlow", "Schedule", "randn", "schedule_class"]
