"""The control battery: small real tasks that rank optimizers (``kaon battery``).

``kaon.battery.run_battery(entries, profile="quick", out="battery-out")`` trains every entry on
a small-data diffusion task (procedural images and real face photographs), a small transformer
language model and the LoRA bag, caches the runs, and writes ``report.md``, ``results.json`` and
PNG plots. :mod:`kaon.battery.registry` lists the entries; :mod:`kaon.battery.tasks` holds the
small denoising task the optimizer tests also use.
"""

from kaon.battery.core import PROFILES, Profile, RunRecord
from kaon.battery.registry import ENTRIES, Entry, entry_from_spec, select
from kaon.battery.runner import default_jobs, run_battery
from kaon.battery.tasks import DenoiseTask, TaskResult, make_images, run_denoise

__all__ = ["DenoiseTask", "ENTRIES", "Entry", "PROFILES", "Profile", "RunRecord", "TaskResult",
           "default_jobs", "entry_from_spec", "make_images", "run_battery", "run_denoise",
           "select"]
