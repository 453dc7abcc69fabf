"""The control battery: small, deterministic tasks that measure optimizers (see tasks.py)."""

from kaon.battery.tasks import DenoiseTask, TaskResult, make_images, run_denoise

__all__ = ["DenoiseTask", "TaskResult", "make_images", "run_denoise"]
