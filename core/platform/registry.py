"""Plugin discovery, contract-version checks and the registries the hooks fill.

Plugins are found through the entry-point group ``runtime.platforms``. A plugin that fails
to import, lacks ``RUNTIME_CONTRACT`` or supports another contract version is skipped with a
warning and recorded in ``Registry.statuses``; it never stops the runtime. So is a first-party
plugin (runtime-cpu, runtime-cuda, ...) whose version is not the core's (:mod:`runtime.release`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import importlib_metadata
import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from ..release import first_party_mismatch
from . import hookspecs, reference
from .interface import AttentionBackend, AttentionSpec, Communicator, Kernel, Platform, QuantizationMethod
from .version import CONTRACT_VERSION

ENTRY_POINT_GROUP = "runtime.platforms"
logger = logging.getLogger(__name__)


@dataclass
class PluginStatus:
    """What discovery did with one entry point; ``runtime plugins`` prints these."""

    name: str
    distribution: str
    version: str
    loaded: bool
    reason: str = ""
    provides: list[str] = field(default_factory=list)


class KernelSet:
    """The ops a platform runs, as attributes: ``ops.rms_norm(x, w, eps)``.

    Each op is the platform's highest-priority registered kernel, else the reference one (but
    ``lora_add``, unregistered beside a registered ``lora_shrink``/``lora_expand``, is made of those;
    ``qk_norm_rotary_embedding`` likewise of a registered ``rms_norm``/``rotary_embedding``, and
    ``linear_lora``, unregistered, of the set's ``linear`` and ``lora_add``).
    ``sources[op]`` says which (``"reference"`` or the kernel's module) for ``runtime plugins``.

    ``deterministic`` (``--deterministic``, contract 1.10) considers only kernels that claim
    ``batch_invariant``, else the reference where it is batch-invariant; ``not_batch_invariant``
    lists the ops left with neither (they run the best kernel, and the engine refuses the mode
    when the model needs one of them).
    """

    def __init__(self, kernels: Iterable[Kernel], deterministic: bool = False):
        best: dict[str, Kernel] = {}
        fallback: dict[str, Kernel] = {}
        for kernel in kernels:
            if kernel.op not in reference.OPS:
                raise ValueError(f"kernel for unknown op {kernel.op!r}; known ops: {', '.join(sorted(reference.OPS))}")
            pool = best if kernel.batch_invariant or not deterministic else fallback
            if kernel.op not in pool or kernel.priority > pool[kernel.op].priority:
                pool[kernel.op] = kernel
        self.deterministic = deterministic
        self.not_batch_invariant: list[str] = []
        if deterministic:
            for op in reference.OPS:
                # linear_lora without a batch-invariant kernel is made of linear and lora_add (below),
                # which answer for themselves.
                if op not in best and op not in reference.BATCH_INVARIANT and op != "linear_lora":
                    self.not_batch_invariant.append(op)
                    if op in fallback:
                        best[op] = fallback[op]
        self.sources: dict[str, str] = {}
        for op, fn in reference.OPS.items():
            chosen = best.get(op)
            setattr(self, op, chosen.fn if chosen else fn)
            self.sources[op] = chosen.fn.__module__ if chosen else "reference"
        if "lora_add" not in best and {"lora_shrink", "lora_expand"} & best.keys():
            # A platform written before contract 1.5 runs lora_add as its own shrink/expand pair per
            # partition (the reference's lora_add would gather every token's weights instead).
            self.lora_add = functools.partial(reference.lora_add_per_slice, self.lora_shrink, self.lora_expand)
            self.sources["lora_add"] = "lora_shrink + lora_expand per partition"
        if "qk_norm_rotary_embedding" not in best and {"rms_norm", "rotary_embedding"} & best.keys():
            # A platform written before contract 1.13 norms and rotates with its own two kernels.
            self.qk_norm_rotary_embedding = functools.partial(reference.rotary_embedding_from, self.rms_norm,
                                                              self.rotary_embedding)
            self.sources["qk_norm_rotary_embedding"] = "rms_norm + rotary_embedding"
        if "linear_lora" not in best:
            # A platform written before contract 1.14 (or, under --deterministic, without a batch-invariant
            # one) runs its linear and then its lora_add: the composition the reference defines.
            self.linear_lora = functools.partial(reference.linear_lora_from, self.linear, self.lora_add)
            self.sources["linear_lora"] = "linear + lora_add"


def _compatible(spec_text: Any) -> str | None:
    if not isinstance(spec_text, str):
        return "does not declare RUNTIME_CONTRACT (a version specifier such as '>=1.0,<2')"
    try:
        spec = SpecifierSet(spec_text)
    except InvalidSpecifier:
        return f"RUNTIME_CONTRACT {spec_text!r} is not a version specifier"
    if Version(CONTRACT_VERSION) not in spec:
        return f"supports contract {spec_text}, this runtime implements {CONTRACT_VERSION}"
    return None


class Registry:
    """Everything the loaded plugins registered. Build one with :func:`get_registry`."""

    def __init__(self, entry_points: Iterable[Any] | None = None):
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self.statuses: list[PluginStatus] = []
        if entry_points is None:
            entry_points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in entry_points:
            self._load_entry_point(ep)

    def _load_entry_point(self, ep: Any) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else "?"
        dist_version = dist.version if dist is not None else "?"
        # Checked before importing: a plugin from another release may not even import against this core.
        mismatch = first_party_mismatch(dist_name, dist_version)
        if mismatch is not None:
            self._skip(ep.name, dist_name, dist_version, mismatch)
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must never take the runtime down
            self._skip(ep.name, dist_name, dist_version, f"import failed: {type(exc).__name__}: {exc}")
            return
        self.register(plugin, ep.name, dist_name, dist_version)

    def _skip(self, name: str, dist: str, version: str, reason: str) -> None:
        warnings.warn(f"runtime plugin {name!r} ({dist} {version}) skipped: {reason}", RuntimeWarning, stacklevel=3)
        self.statuses.append(PluginStatus(name, dist, version, loaded=False, reason=reason))

    def register(self, plugin: Any, name: str, distribution: str = "?", version: str = "?") -> bool:
        """Register an already-imported plugin object (tests and in-process plugins use this)."""
        reason = _compatible(getattr(plugin, "RUNTIME_CONTRACT", None))
        if reason is None:
            try:
                self.plugin_manager.register(plugin, name=name)
            except Exception as exc:
                reason = f"invalid hook implementation: {exc}"
        if reason is not None:
            self._skip(name, distribution, version, reason)
            return False
        try:
            provides = [f"platform:{p.name}" for p in self._call(hookspecs.runtime_platforms.__name__, plugin)]
        except Exception as exc:
            self.plugin_manager.unregister(name=name)
            self._skip(name, distribution, version, f"runtime_platforms failed: {type(exc).__name__}: {exc}")
            return False
        self.statuses.append(PluginStatus(name, distribution, version, loaded=True, provides=provides))
        return True

    def _call(self, hook_name: str, only: Any = None) -> list[Any]:
        hook = getattr(self.plugin_manager.hook, hook_name)
        if only is not None:
            impls = [i for i in hook.get_hookimpls() if i.plugin is only]
            results = [i.function() for i in impls]
        else:
            results = hook()
        return [item for result in results if result for item in result]

    @property
    def platforms(self) -> dict[str, type[Platform]]:
        return {p.name: p for p in self._call("runtime_platforms")}

    def attention_backends(self, platform: str) -> list[type[AttentionBackend]]:
        backends = [b for b in self._call("runtime_attention_backends") if b.platform == platform]
        return sorted(backends, key=lambda b: -b.priority)

    def kernels(self, platform: str, deterministic: bool = False) -> KernelSet:
        return KernelSet((k for k in self._call("runtime_kernels") if k.platform == platform), deterministic)

    def communicator(self, platform: str) -> type[Communicator]:
        for comm in self._call("runtime_communicators"):
            if comm.platform == platform:
                return comm
        raise ValueError(f"platform {platform} registers no communicator, so it cannot run with --tensor-parallel-size > 1")

    def quantization_methods(self, platform: str) -> list[type[QuantizationMethod]]:
        return [m for m in self._call("runtime_quantization_methods") if m.platform == platform]

    def quantization_method(self, platform: str, fmt: str) -> QuantizationMethod:
        methods = [m for m in self.quantization_methods(platform) if m.name == fmt]
        if not methods:
            raise ValueError(f"platform {platform} has no quantization method for {fmt} checkpoints; "
                             f"install a plugin that provides one or choose another --device")
        return max(methods, key=lambda m: m.priority)()

    def select_platform(self, name: str | None = None) -> Platform:
        """The platform ``--device name`` asks for, or the available one of highest priority."""
        platforms = self.platforms
        if name is not None and name != "auto":
            if name not in platforms:
                known = ", ".join(sorted(platforms)) or "none"
                raise ValueError(f"unknown --device {name!r}: installed platforms are {known} (see `runtime plugins`)")
            cls = platforms[name]
            reason = cls.unavailable_reason()
            if reason is not None:
                raise ValueError(f"platform {name!r} is installed but not available on this machine ({reason}); "
                                 "choose another --device")
            return cls()
        available = [p for p in platforms.values() if p.is_available()]
        if not available:
            raise RuntimeError("no platform is available: install runtime[cpu] (see `runtime plugins` for why others were skipped)")
        return max(available, key=lambda p: p.priority)()

    def _attention_choice(self, platform: str, spec: AttentionSpec) -> tuple[type[AttentionBackend] | None, list[str]]:
        reasons = []
        for backend in self.attention_backends(platform):
            why = backend.unsupported_reason(spec)
            if why is None:
                return backend, reasons
            reasons.append(f"{backend.name} ({why})")
        return None, reasons

    def select_attention_backend(self, platform: str, spec: AttentionSpec) -> type[AttentionBackend]:
        backend, reasons = self._attention_choice(platform, spec)
        if backend is None:
            detail = "; ".join(reasons) if reasons else "the platform registers no attention backend"
            raise ValueError(f"no attention backend on {platform} supports this model ({detail})")
        return backend

    def attention_passed_over(self, platform: str, spec: AttentionSpec) -> list[str]:
        """The backends of higher priority than the one selected for ``spec``, each as
        ``"name (why not)"``: the fallbacks a start-up report names."""
        return self._attention_choice(platform, spec)[1]


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry of installed plugins, discovered on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
