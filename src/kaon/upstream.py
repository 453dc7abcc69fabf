"""Upstream argument names: the arguments of the projects kaon replaces, mapped onto kaon's.

kaon replaces K-Optimizers, KempnerForge's optimizer module, OAdamW (and optimi's StableAdamW),
adafactor8bit and K-Prodigy. A user switching libraries changes one import and keeps their
calls, so every optimizer accepts the argument names its upstream counterpart documented. Each
optimizer class lists them in one table, ``upstream_arguments`` (a dict ``name ->``
:class:`Upstream`); :class:`kaon.KaonOptimizer` applies the table of the class (and of its base
classes) to the keyword arguments before the class's own ``__init__`` runs, so a constructor
never re-implements it. An entry either

* **maps** the value onto kaon's own arguments (``rename``, or a function returning the kaon
  keyword arguments, possibly none when the value is what kaon already does), or
* **refuses** it with a ``ValueError`` that names the argument and says what to use in kaon
  instead, for a value kaon has no equivalent for.

The entries are listed per project, with the reasons, in ``docs/migrating.md``.

Example::

    class MyOptimizer(KaonOptimizer, names=("MyOptimizer",)):
        upstream_arguments = {
            "clip": rename("the original", "clip_threshold"),
            "use_cuda_kernel": ignored("the original", "kaon picks its own kernels"),
            "lag_norm": refused("the original", "kaon always clips with the current norm"),
        }
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Upstream",
    "UnsupportedError",
    "rename",
    "ignored",
    "refused",
    "mapped",
    "table",
    "translate",
]


class UnsupportedError(Exception):
    """Raised by a mapping function for a value kaon has no equivalent for; ``str`` says what to
    use in kaon instead."""


@dataclass(frozen=True)
class Upstream:
    """One upstream argument.

    project: the project that documented it (``"adafactor8bit"``, ``"K-Optimizers"``, ...).
    rule: ``value -> {kaon_argument: value, ...}``; raises :class:`UnsupportedError` to refuse.
    doc: one line for the migration table: what the argument becomes in kaon.
    """

    project: str
    rule: Callable[[Any], dict[str, Any]]
    doc: str


def rename(project: str, to: str, convert: Callable[[Any], Any] | None = None,
           doc: str = "") -> Upstream:
    """The upstream argument is kaon's ``to`` (with ``convert`` applied to the value, if given).
    ``convert`` may raise :class:`UnsupportedError` for values kaon cannot honour."""

    def rule(value: Any) -> dict[str, Any]:
        return {to: convert(value) if convert is not None else value}

    return Upstream(project, rule, doc or f"`{to}`")


def ignored(project: str, why: str, when: Callable[[Any], bool] | None = None,
            use: str = "") -> Upstream:
    """Accepted without effect, because kaon already does what it asks (``why``); with
    ``when``, only for the values it accepts, the others refused with ``use``."""

    def rule(value: Any) -> dict[str, Any]:
        if when is not None and not when(value):
            raise UnsupportedError(use)
        return {}

    return Upstream(project, rule, f"accepted, no effect: {why}")


def refused(project: str, use: str, when: Callable[[Any], bool] | None = None) -> Upstream:
    """Refused with ``use`` (what to use in kaon instead); with ``when``, only the values for
    which ``when`` is true, the others (the upstream default, say) accepted without effect."""

    def rule(value: Any) -> dict[str, Any]:
        if when is None or when(value):
            raise UnsupportedError(use)
        return {}

    return Upstream(project, rule, f"refused: {use}")


def mapped(project: str, rule: Callable[[Any], dict[str, Any]], doc: str) -> Upstream:
    """A general mapping: ``rule(value)`` returns the kaon keyword arguments."""
    return Upstream(project, rule, doc)


def table(cls: type) -> dict[str, Upstream]:
    """The upstream table of ``cls``: its own ``upstream_arguments`` over its base classes'."""
    merged: dict[str, Upstream] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("upstream_arguments", {}))
    return merged


def translate(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every upstream argument of ``cls`` replaced by its kaon arguments.

    Raises ``ValueError`` naming the argument (and what to use instead) for a refused value,
    and when an upstream argument and the kaon argument it maps to are both given with
    different values. Nothing is changed for names that are not in the table.
    """
    entries = table(cls)
    owner = cls.__name__
    if not entries or not any(name in entries for name in kwargs):
        return kwargs
    out = {k: v for k, v in kwargs.items() if k not in entries}
    set_keys: set[str] = set()
    for name, value in kwargs.items():
        entry = entries.get(name)
        if entry is None:
            continue
        try:
            produced = entry.rule(value)
        except UnsupportedError as refusal:
            raise ValueError(
                f"{owner}: {name}={value!r} (an argument of {entry.project}) is not supported "
                f"by kaon; {refusal}"
            ) from None
        for key, new in produced.items():
            clash = key != name or key in set_keys  # given as kaon's, or by another entry
            if key in out and clash and not _same(out[key], new):
                raise ValueError(
                    f"{owner}: {name}={value!r} (an argument of {entry.project}) sets "
                    f"{key}={new!r}, but {key}={out[key]!r} is given too; pass only one of them"
                )
            out[key] = new
            set_keys.add(key)
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain truth value
        return a is b


# --------------------------------------------------------------------- shared upstream entries
K_OPTIMIZERS = "K-Optimizers"


def is_value(*accepted: Any) -> Callable[[Any], bool]:
    return lambda value: any(value is a or (type(value) is type(a) and value == a)
                             for a in accepted)


def k_optimizers_auto_lr() -> dict[str, Upstream]:
    """K-Optimizers 0.7.4's ``auto_lr`` flag and its knobs (Adakaon, Nekaon, Lion, AdaPNM,
    AdaMuon): kaon has no per-optimizer auto-lr mixin; ``kaon.Autokaon`` is the parameter-free
    Adakaon. The off values (the upstream defaults) are accepted."""
    use = ("kaon has no auto_lr flag: use kaon.Autokaon(params, **adakaon_kwargs) (Adakaon with "
           "its lr discovered by a distance estimate, then frozen), or set lr")
    return {
        "auto_lr": refused(K_OPTIMIZERS, use, when=lambda v: v is not False),
        "auto_lr_scale": refused(K_OPTIMIZERS, "Autokaon's d_coef scales its estimate; " + use,
                                 when=lambda v: not is_value(1.0, 1)(v)),
        "auto_lr_fuse_rel": refused(K_OPTIMIZERS, "Autokaon's lr_cap bounds its estimate; " + use,
                                    when=lambda v: not is_value(20.0, 20)(v)),
        "auto_lr_d0": refused(K_OPTIMIZERS, "Autokaon's d0 is its starting estimate; " + use,
                              when=lambda v: v is not None),
    }


def k_optimizers_fused_tile_cap() -> dict[str, Upstream]:
    """``fused_tile_cap`` (Adakaon, AdaPNM): a tile-size bound of the upstream Triton kernels.
    kaon's kernels size their own tiles; the value changes no number."""
    return {"fused_tile_cap": ignored(
        K_OPTIMIZERS, "kaon's Triton kernels size their own tiles (fused= chooses the kernel)",
        when=lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        use="fused_tile_cap must be None or a positive int")}


# ------------------------------------------------------------------- KempnerForge's config
KEMPNERFORGE = "KempnerForge"
#: KempnerForge's optimizer names -> kaon's registered names
KEMPNERFORGE_NAMES = {"adamw": "AdamW", "lion": "Lion", "muon": "Muon",
                      "schedule_free_adamw": "ScheduleFreeAdamW"}
_KEMPNERFORGE_FIELDS = ("name", "lr", "weight_decay", "betas", "eps", "fused", "muon_momentum",
                        "muon_ns_steps", "muon_adam_lr", "schedule_free_warmup_steps")


def is_kempnerforge_config(value: Any) -> bool:
    """Whether ``value`` looks like KempnerForge's ``OptimizerConfig`` (duck-typed: any object
    with its ``name`` and ``muon_momentum`` attributes, such as
    :class:`kaon.integrations.kempnerforge.OptimizerConfig` or KempnerForge's own)."""
    return (not isinstance(value, (str, dict, type)) and hasattr(value, "name")
            and hasattr(value, "muon_momentum"))


def kempnerforge_config(config: Any) -> tuple[str, dict[str, Any]]:
    """KempnerForge's ``OptimizerConfig`` as ``(kaon name, constructor kwargs)``.

    The fields go where KempnerForge's builder sends them: ``lr`` and ``weight_decay`` to every
    optimizer; ``betas`` and ``eps`` to AdamW and ScheduleFreeAdamW (Lion takes ``betas``
    only, Muon ``adam_betas`` / ``adam_eps`` of its AdamW path); ``fused`` to AdamW (True:
    torch's fused kernel where available, ``fused=None``); ``muon_momentum``,
    ``muon_ns_steps`` and ``muon_adam_lr`` to Muon's ``momentum``, ``ns_steps`` and
    ``adam_lr`` (None: the Muon lr, as upstream); ``schedule_free_warmup_steps`` to
    ScheduleFreeAdamW's ``warmup_steps``. KempnerForge's rules are kept: Lion without kaon's
    cautious mask and centralization and with float32 momentum, Muon without Nesterov and
    with its Newton-Schulz iteration in float32.
    Missing fields take KempnerForge's defaults. Raises ``ValueError`` for an unknown name.
    """
    from kaon.integrations.kempnerforge import OptimizerConfig  # the defaults, in one place

    defaults = OptimizerConfig()
    field = {f: getattr(config, f, getattr(defaults, f)) for f in _KEMPNERFORGE_FIELDS}
    name = str(field["name"]).lower()
    if name not in KEMPNERFORGE_NAMES:
        raise ValueError(f"{KEMPNERFORGE} config: name must be one of "
                         f"{', '.join(KEMPNERFORGE_NAMES)}; got {field['name']!r}")
    kwargs: dict[str, Any] = {"lr": field["lr"], "weight_decay": field["weight_decay"]}
    betas, eps = tuple(field["betas"]), field["eps"]
    if name == "adamw":
        kwargs.update(betas=betas, eps=eps, fused=None if field["fused"] else False)
    elif name == "lion":
        kwargs.update(betas=betas, cautious=False, gradient_centralization=False,
                      momentum_dtype="float32")
    elif name == "schedule_free_adamw":
        kwargs.update(betas=betas, eps=eps, warmup_steps=field["schedule_free_warmup_steps"])
    else:
        kwargs.update(momentum=field["muon_momentum"], ns_steps=field["muon_ns_steps"],
                      adam_betas=betas, adam_eps=eps, adam_lr=field["muon_adam_lr"],
                      nesterov=False, ns_dtype="float32")
    return KEMPNERFORGE_NAMES[name], kwargs
