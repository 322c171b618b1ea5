"""Where the parts of a segmentation network live: :class:`ArchLayout`.

MONAI gives the networks; it does not say *which parameters form which part* of each one. Transfer
modes (SPEC section 4: ``all_but_head``, ``frozen_encoder``, ``truncated:k``, ``encoder_only`` ...),
feature extraction for transferability estimation (SPEC section 5: hooks on the decoder stages) and
the robustness score (thesis ch. 4: the second-to-last encoder level) all read it from here. Every
registered network (:mod:`medxfer.networks.registry`) has a layout function returning one.

A layout can also come from the user (``--layout FILE``, a bank entry's ``layout``):
:func:`layout_from_dict` reads one and :func:`check_layout` checks it against the network it is
meant for. A network without a known layout gets one from
:func:`medxfer.networks.auto_layout.auto_layout`. Every problem is a one-line :class:`LayoutError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["ArchLayout", "LayoutError", "LAYOUT_KEYS", "layout_from_dict", "check_layout"]

#: The keys of a layout written as a mapping (:meth:`ArchLayout.to_dict`, :func:`layout_from_dict`).
LAYOUT_KEYS = ("encoder_levels", "decoder_stages", "head", "penultimate_encoder", "cut_off")


class LayoutError(ValueError):
    """No layout of a network can be found, or a given one does not describe it (one line)."""


@dataclass
class ArchLayout:
    """Where the parts of a network live, as names relative to the network (no trailing dot).

    Attributes:
        encoder_levels: ``encoder_levels[k-1]`` = module-name prefixes forming encoder level ``k``.
        decoder_stages: module names whose outputs are the decoder feature maps, deepest first
            (empty for an encoder classifier, which has no decoder).
        head: module-name prefixes of the last (class-specific) block.
        penultimate_encoder: module whose output is the second-to-last encoder level's feature map
            ``(B, C, *spatial)``, the representation the robustness score reads (thesis ch. 4).
        cut_off: module-name prefixes of a *source* network that this network dropped on purpose
            (a truncated encoder's deeper levels): checkpoint keys under them are skipped by the
            transfer, not reported as unknown.
    """

    arch: str
    encoder_levels: list[list[str]]
    decoder_stages: list[str]
    head: list[str] = field(default_factory=list)
    penultimate_encoder: str = ""
    cut_off: list[str] = field(default_factory=list)

    @staticmethod
    def _match(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    def in_head(self, key: str) -> bool:
        """Is the parameter / buffer ``key`` part of the head?"""
        return self._match(key, self.head)

    def is_cut_off(self, key: str) -> bool:
        """Does ``key`` belong to a part of the source network this network dropped (``cut_off``)?"""
        return self._match(key, self.cut_off)

    def encoder_level(self, key: str) -> int | None:
        """Encoder level (1-based) of ``key``; ``None`` for decoder / head keys."""
        for level, prefixes in enumerate(self.encoder_levels, start=1):
            if self._match(key, prefixes):
                return level
        return None

    def feature_stages(self) -> list[str]:
        """Modules the feature-based estimators read, deepest first: the decoder stages, or, for a
        network without a decoder (a pretraining encoder classifier), its last two encoder levels."""
        if self.decoder_stages:
            return list(self.decoder_stages)
        return [self.encoder_levels[-1][0], self.penultimate_encoder]

    def to_dict(self) -> dict:
        """The layout as plain lists (what :func:`layout_from_dict` reads back; ``arch`` left out)."""
        return {"encoder_levels": [list(level) for level in self.encoder_levels],
                "decoder_stages": list(self.decoder_stages), "head": list(self.head),
                "penultimate_encoder": self.penultimate_encoder, "cut_off": list(self.cut_off)}

    @classmethod
    def from_dict(cls, d: Mapping, arch: str) -> "ArchLayout":
        """Same as :func:`layout_from_dict`."""
        return layout_from_dict(d, arch)


def _names(value, what: str, arch: str, allow_str: bool = True) -> list[str]:
    """A list of non-empty names (a single string counts as a list of one when ``allow_str``)."""
    if isinstance(value, str) and allow_str:
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LayoutError(f"layout of {arch}: {what} must be a list of module names, got {value!r}")
    return [v.strip() for v in value]


def layout_from_dict(d: Mapping, arch: str) -> ArchLayout:
    """An :class:`ArchLayout` from a mapping (a ``--layout`` file, a bank entry's ``layout``).

    Keys (:data:`LAYOUT_KEYS`): ``encoder_levels`` (required: a list of levels, highest resolution
    first, each a list of module-name prefixes or one name), ``head`` (required: a name or a list),
    ``decoder_stages`` (deepest first; default none: the estimators then read the last two encoder
    levels), ``penultimate_encoder`` (default ``""``: no robustness score), ``cut_off`` (default
    none). An ``arch`` key, when present, must equal ``arch``. Names are not checked against a
    network here: :func:`check_layout` does that.
    """
    if not isinstance(d, Mapping):
        raise LayoutError(f"layout of {arch}: a layout is a mapping with keys {list(LAYOUT_KEYS)}, "
                          f"got a {type(d).__name__}")
    unknown = [k for k in d if k not in LAYOUT_KEYS and k != "arch"]
    if unknown:
        raise LayoutError(f"layout of {arch}: unknown key {unknown[0]!r} (allowed: {', '.join(LAYOUT_KEYS)})")
    if "arch" in d and str(d["arch"]) != str(arch):
        raise LayoutError(f"layout of {arch}: the layout says arch {d['arch']!r}")
    for key in ("encoder_levels", "head"):
        if key not in d:
            raise LayoutError(f"layout of {arch}: {key!r} is missing")
    levels = d["encoder_levels"]
    if not isinstance(levels, (list, tuple)) or not levels:
        raise LayoutError(f"layout of {arch}: encoder_levels must be a non-empty list of levels, got {levels!r}")
    levels = [_names(level, f"encoder level {k}", arch) for k, level in enumerate(levels, start=1)]
    head = _names(d["head"], "head", arch)
    if not head:
        raise LayoutError(f"layout of {arch}: head must name at least one module")
    stages = _names(d.get("decoder_stages") or [], "decoder_stages", arch, allow_str=False)
    penultimate = d.get("penultimate_encoder") or ""
    if not isinstance(penultimate, str):
        raise LayoutError(f"layout of {arch}: penultimate_encoder must be one module name, got {penultimate!r}")
    cut_off = _names(d.get("cut_off") or [], "cut_off", arch)
    return ArchLayout(str(arch), levels, stages, head, penultimate.strip(), cut_off)


def _unwrap(network):
    """Look through ``DistributedDataParallel`` (``module``) and ``torch.compile`` (``_orig_mod``)."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def _has_module(network, name: str) -> bool:
    try:
        network.get_submodule(name)  # follows every path, also a second name of a shared module
    except AttributeError:
        return False
    return True


def check_layout(layout: ArchLayout, network) -> None:
    """Does ``layout`` describe ``network``? A :class:`LayoutError` naming the network class and the
    first name it lacks, else ``None``.

    Checked, in this order: every decoder stage and the penultimate encoder module (when given) is
    a module of the network (hooks go there); every prefix of ``encoder_levels`` and ``head``
    matches at least one state-dict key (transfer modes select keys with them); no state-dict key
    is in two encoder levels or in an encoder level and the head. ``cut_off`` names modules of a
    *source* network and is not checked.
    """
    network = _unwrap(network)
    cls = type(network).__name__
    for role, names in (("decoder stage", layout.decoder_stages),
                        ("penultimate encoder", [layout.penultimate_encoder] if layout.penultimate_encoder else [])):
        for name in names:
            if not _has_module(network, name):
                raise LayoutError(f"{cls}: the layout's {role} {name!r} is not a module of the network; "
                                  "pass a layout with the network's module names (--layout)")
    keys = list(network.state_dict())
    parts = [(f"encoder level {k}", p) for k, level in enumerate(layout.encoder_levels, start=1) for p in level]
    for role, prefix in parts + [("head", p) for p in layout.head]:
        if not any(ArchLayout._match(key, [prefix]) for key in keys):
            raise LayoutError(f"{cls}: the layout's {role} names {prefix!r}, which matches no parameter or buffer of "
                              "the network; pass a layout with the network's module names (--layout)")
    for key in keys:
        levels = [k for k, level in enumerate(layout.encoder_levels, start=1) if ArchLayout._match(key, level)]
        if len(levels) > 1 or (levels and layout.in_head(key)):
            where = " and ".join([f"encoder level {k}" for k in levels] + (["head"] if layout.in_head(key) else []))
            raise LayoutError(f"{cls}: {key!r} is in {where} of the layout; each tensor belongs to one part")
