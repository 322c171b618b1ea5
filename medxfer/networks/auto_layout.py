"""A layout for a network medxfer does not know, read from one traced forward pass (issue 14).

:func:`auto_layout` runs the network once on a zero input ``(1, in_channels, *roi_size)`` (eval
mode, ``torch.no_grad``, every module's train / eval mode restored afterwards) with a forward
pre-hook and hook on every module, and records each module call: when it starts and ends, and the
spatial size of its input and output when they are *feature maps*: tensors ``(1, C, *spatial)``
with as many spatial axes as the input, channels first, no side larger than the input's, and more
than one voxel (a one-voxel map is a global descriptor, e.g. a squeeze-excitation branch, not a
resolution), not returned by a padding module (``nn.ConstantPad2d`` ...: a "same" padding is not a
resolution either). *Leaves* are modules without children; *owners* are modules holding parameters or
buffers themselves; sizes are compared by voxel count. The rule, written by hand (no library
derives an encoder / decoder split from a trace):

1. **Bottleneck.** ``m`` = the smallest size any leaf outputs; the first leaf reaching it is the
   bottleneck. No leaf below the input size: no downsampling, no layout.
2. **Decoder start.** The first leaf after the bottleneck whose output is larger than ``m`` is the
   first upsampling. Its outermost enclosing call (below the network itself) whose first leaf comes
   after the bottleneck is where the decoder starts; so an upsampling block that begins with a
   convolution still at ``m`` (SegResNet's ``up_samples.0``) is decoder as a whole. No larger
   output after the bottleneck: not an encoder-decoder, no layout.
3. **Encoder levels.** Owners first called before the decoder start form the encoder; each one's
   level is the size of its output (an owner without a feature-map output takes the size of the
   owner called before it, or after it when it is the first): one level per distinct size, largest
   (highest resolution) first. A convolution that runs at the previous resolution right before a
   strided one (ResNet's bottleneck ``conv1``) is therefore in the previous level.
4. **Head.** Let ``T`` be the end of the last leaf whose output differs from the network's output
   in channels or spatial size; the head is every owner first called after ``T`` (and not in the
   encoder). When there is none (a network that interpolates its logits afterwards), ``T`` is the
   end of the last leaf whose output has other than the network's output channels. No owner after
   ``T``: no head, no layout.
5. **Decoder stages.** A *block* is a call that runs once, contains parameters and returns a
   feature map. Among the blocks that start at or after the decoder start, end before the head
   starts, return a size larger than ``m`` and return only that size inside (their own output and
   every output of a call within them): per size, the one with the most parameters (the block doing
   the work at that resolution: SegResNet's ``up_layers.k`` rather than the 1x1 convolution that
   opens the next upsampling, DynUNet's ``upsamples.k`` rather than a deep-supervision head; ties:
   the outermost); ordered deepest (smallest) first.
6. **Penultimate encoder.** The deepest level is entered by the outermost call that contains the
   first leaf returning the deepest encoder size and takes the second-deepest size as input (else
   at the decoder start). Among the blocks that end before it, return the second-deepest size and
   nothing smaller inside: the one that ends last (that level's final feature map).

Every state-dict key then has exactly one place: the encoder level or head of the module owning it,
else the decoder (owners never called in the forward pass, e.g. an unused classifier or disabled
deep-supervision heads, and parameters of the network module itself, are decoder). Prefixes are
written compactly: the outermost module path whose keys are all in one part (a module held under
two names, e.g. nnU-Net's ``decoder.encoder``, appears under both, as in the state dict).

On MONAI's UNet, SegResNet, BasicUNet, DynUNet, FlexibleUNet and nnU-Net's networks this gives the
known layout's head (DynUNet / nnU-Net: the head that runs) and decoder feature maps of the known
shapes (tests/test_networks_imported.py). Encoder levels group by resolution, so where a known
layout splits one resolution into two levels (UNet's last down block and its bottom block) the
automatic one has one level fewer. A module that runs twice (weight sharing) is never a decoder
stage or the penultimate module (its hook would fire twice). Transformer tokens are not feature
maps; channel-last maps whose last axis fits in the input are misread: networks built of those
(UNETR, Swin transformers) need an explicit layout, as does a network whose bottleneck has one
voxel at the given roi (use a larger roi).

When no layout can be found (the forward pass fails on the dummy input, the output is not one
tensor, rules 1-6 find no bottleneck / upsampling / head / decoder stage / second level)
:class:`~medxfer.networks.layout.LayoutError` names the network class and asks for an explicit
layout (``--layout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn.modules import padding

from medxfer.networks.layout import ArchLayout, LayoutError, check_layout, layout_from_dict

__all__ = ["auto_layout", "LayoutError", "layout_from_dict", "check_layout"]

#: Their outputs are not a resolution (a "same" padding before a convolution grows the map by a few voxels).
_PADDING = (padding._ConstantPadNd, padding._ReflectionPadNd, padding._ReplicationPadNd, padding._CircularPadNd)


@dataclass(eq=False)
class _Call:
    module: torch.nn.Module
    start: int
    parent: "_Call | None"
    in_size: tuple[int, ...] | None = None  # spatial size of the first tensor argument, when a feature map
    end: int = -1
    first_leaf: int | None = None  # index (in _Trace.leaves) of the first leaf called inside this call
    leaf_index: int | None = None  # this call's own index when the module is a leaf
    size: tuple[int, ...] | None = None  # spatial size of the output, when a feature map
    channels: int | None = None


class _Trace:
    """Forward (pre-)hooks on every module recording :class:`_Call` s in start order."""

    def __init__(self, network: torch.nn.Module, roi: Sequence[int]):
        self.roi = tuple(roi)
        self.calls: list[_Call] = []
        self.leaves: list[_Call] = []
        self.stack: list[_Call] = []
        self.clock = 0
        self.handles = []
        for module in network.modules():
            leaf = next(module.children(), None) is None
            self.handles.append(module.register_forward_pre_hook(lambda m, args, leaf=leaf: self._pre(m, args, leaf)))
            self.handles.append(module.register_forward_hook(lambda m, args, out: self._post(m, out)))

    def _size(self, t) -> tuple[int, ...] | None:
        if not isinstance(t, torch.Tensor) or t.ndim != len(self.roi) + 2 or t.shape[0] != 1:
            return None
        size = tuple(int(s) for s in t.shape[2:])
        if math.prod(size) <= 1 or any(s > r for s, r in zip(size, self.roi)):
            return None
        return size

    def _pre(self, module, args, leaf: bool):
        call = _Call(module, self.clock, self.stack[-1] if self.stack else None,
                     in_size=self._size(args[0]) if args else None)
        self.clock += 1
        self.calls.append(call)
        if leaf:
            call.leaf_index = call.first_leaf = len(self.leaves)
            self.leaves.append(call)
            for outer in reversed(self.stack):  # outer calls without a leaf yet get this one
                if outer.first_leaf is not None:
                    break
                outer.first_leaf = call.leaf_index
        self.stack.append(call)

    def _post(self, module, out):
        while self.stack and self.stack[-1].module is not module:  # a call left by an exception
            self.stack.pop()
        if not self.stack:
            return
        call = self.stack.pop()
        call.end = self.clock
        self.clock += 1
        call.size = None if isinstance(module, _PADDING) else self._size(out)
        if call.size is not None:
            call.channels = int(out.shape[1])

    def remove(self):
        for h in self.handles:
            h.remove()


def _fail(network: torch.nn.Module, reason: str) -> LayoutError:
    reason = " ".join(str(reason).split())  # one line
    return LayoutError(f"{type(network).__name__}: no layout found automatically: {reason}; "
                       "pass an explicit layout (--layout)")


def _owns_state(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


class _Node:
    __slots__ = ("path", "parts", "children")

    def __init__(self, path: str):
        self.path, self.parts, self.children = path, set(), {}


def _compact(keys: Sequence[str], part_of) -> dict:
    """``part -> [prefix, ...]``: the outermost key paths whose keys all belong to one part."""
    root = _Node("")
    for key in keys:
        node, part, names = root, part_of(key), key.split(".")
        for i, name in enumerate(names):
            node = node.children.setdefault(name, _Node(".".join(names[:i + 1])))
            node.parts.add(part)
    out: dict = {}

    def emit(node: _Node):
        if len(node.parts) == 1:
            out.setdefault(next(iter(node.parts)), []).append(node.path)
            return
        for child in node.children.values():
            emit(child)

    for child in root.children.values():
        emit(child)
    return out


def auto_layout(network: torch.nn.Module, in_channels: int, roi_size: Sequence[int] | int,
                arch: str = "custom") -> ArchLayout:
    """The :class:`~medxfer.networks.layout.ArchLayout` of ``network`` by the module docstring's rule.

    Args:
        network: any ``nn.Module`` mapping ``(B, in_channels, *roi_size)`` to one tensor
            ``(B, out_channels, *spatial)`` (a ``DistributedDataParallel`` / compiled wrapper is
            looked through).
        in_channels: input channels of the dummy input.
        roi_size: its spatial size (a size the network accepts; an int means a 3D cube).
        arch: the ``arch`` the layout carries.

    Raises:
        LayoutError: no layout can be found (module docstring); one line naming the network class.
    """
    network = getattr(network, "module", network)
    network = getattr(network, "_orig_mod", network)
    roi = [int(roi_size)] * 3 if isinstance(roi_size, (int, float)) else [int(r) for r in roi_size]
    param = next(iter(network.parameters()), None)
    if param is None:
        raise _fail(network, "it has no parameters")
    x = torch.zeros(1, int(in_channels), *roi, device=param.device,
                    dtype=param.dtype if param.dtype.is_floating_point else torch.float32)
    modes = [(m, m.training) for m in network.modules()]
    trace = _Trace(network, roi)
    try:
        network.eval()
        with torch.no_grad():
            out = network(x)
    except Exception as e:  # noqa: BLE001 - whatever the network raises, the answer is the same one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _fail(network, f"its forward pass on a zero input {list(x.shape)} fails ({type(e).__name__}: "
                             f"{first[:200]})") from None
    finally:
        trace.remove()
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor):
        raise _fail(network, f"its forward pass returns a {type(out).__name__}, not one (B, C, *spatial) tensor")
    if out.ndim != len(roi) + 2:
        raise _fail(network, f"its output {list(out.shape)} is not a (B, C, *spatial) map of the {len(roi)}D input")
    return _rule(network, trace, roi, tuple(int(s) for s in out.shape[1:]), str(arch))


def _rule(network: torch.nn.Module, trace: _Trace, roi: list[int], out_shape: tuple[int, ...], arch: str) -> ArchLayout:
    calls, vox = trace.calls, math.prod
    root = calls[0] if calls and calls[0].module is network else None
    runs: dict[int, int] = {}
    first_call: dict[int, _Call] = {}
    for c in calls:
        runs[id(c.module)] = runs.get(id(c.module), 0) + 1
        first_call.setdefault(id(c.module), c)
    sized = [c for c in trace.leaves if c.size is not None]
    if not sized:
        raise _fail(network, "no module returns a (B, C, *spatial) feature map")
    m = min(vox(c.size) for c in sized)
    if m >= vox(roi):
        raise _fail(network, f"no module output is smaller than the input {roi} (no spatial downsampling)")
    # 1-2: bottleneck, first upsampling, decoder start
    bottleneck = next(c for c in sized if vox(c.size) == m)
    up = next((c for c in sized if c.leaf_index > bottleneck.leaf_index and vox(c.size) > m), None)
    if up is None:
        raise _fail(network, f"nothing is upsampled after the deepest feature map {list(bottleneck.size)} "
                             "(not an encoder-decoder)")
    start = up
    while start.parent is not None and start.parent is not root and start.parent.first_leaf > bottleneck.leaf_index:
        start = start.parent
    t_dec = start.start
    # 3: encoder owners and their levels
    owners = [first_call[id(mod)] for mod in network.modules() if mod is not network and _owns_state(mod)
              and id(mod) in first_call]
    encoder = sorted((c for c in owners if c.start < t_dec), key=lambda c: c.start)
    sizes = [c.size for c in encoder]
    known = [s for s in sizes if s is not None]
    if not known:
        raise _fail(network, "no module with parameters before the decoder returns a feature map")
    last = known[0]
    for i, s in enumerate(sizes):
        last = sizes[i] = s if s is not None else last
    order = sorted(dict.fromkeys(sizes), key=lambda s: (-vox(s), sizes.index(s)))
    if len(order) < 2:
        raise _fail(network, f"its encoder has one resolution only ({list(order[0])})")
    level_of = {id(c.module): order.index(s) + 1 for c, s in zip(encoder, sizes)}
    # 4: head
    head_owners: list[_Call] = []
    for differs in (lambda c: (c.channels, *c.size) != out_shape, lambda c: c.channels != out_shape[0]):
        t = max((c.end for c in sized if differs(c)), default=-1)
        head_owners = [c for c in owners if c.start > t and id(c.module) not in level_of]
        if head_owners:
            break
    if not head_owners:
        raise _fail(network, f"no module with parameters runs after the last feature map with other than the output's "
                             f"{out_shape[0]} channels (no class-specific head)")
    head_ids = {id(c.module) for c in head_owners}
    head_start = min(c.start for c in head_owners)
    names: dict[int, str] = {}
    for name, mod in network.named_modules():
        names.setdefault(id(mod), name)
    inner: dict[int, set] = {}  # id(call) -> the feature-map sizes it and every call inside it return
    for c in calls:
        a = c
        while a is not None and c.size is not None:
            inner.setdefault(id(a), set()).add(c.size)
            a = a.parent
    weight: dict[int, int] = {}

    def params(c: _Call) -> int:
        if id(c.module) not in weight:
            weight[id(c.module)] = sum(p.numel() for p in c.module.parameters())
        return weight[id(c.module)]

    def block(c: _Call) -> bool:
        return c is not root and c.size is not None and runs[id(c.module)] == 1 and params(c) > 0

    # 5: decoder stages
    best: dict[tuple, _Call] = {}
    for c in calls:
        if (block(c) and c.start >= t_dec and c.end < head_start and vox(c.size) > m
                and inner[id(c)] == {c.size}):
            if c.size not in best or (params(c), c.end) > (params(best[c.size]), best[c.size].end):
                best[c.size] = c
    if not best:
        raise _fail(network, "no module between the bottleneck and the head returns a feature map (no decoder stage)")
    stages = [names[id(c.module)] for c in sorted(best.values(), key=lambda c: (vox(c.size), c.end))]
    # 6: penultimate encoder
    deepest, second = order[-1], order[-2]
    entry = next((c for c in sized if c.start < t_dec and c.size == deepest), None)
    bound = t_dec
    a = entry
    while a is not None and a is not root:
        if a.in_size == second:
            bound = min(bound, a.start)
        a = a.parent
    penultimate = max((c for c in calls if block(c) and c.end < bound and c.size == second
                       and all(vox(s) >= vox(second) for s in inner[id(c)])), key=lambda c: c.end, default=None)
    if penultimate is None:
        raise _fail(network, f"no encoder module returns the second-deepest encoder feature map {list(second)}")
    # every state-dict key in one part
    owner_part: dict[str, object] = {}

    def part_of(key: str):
        path = key.rpartition(".")[0]
        if path not in owner_part:
            mod = network.get_submodule(path) if path else network
            owner_part[path] = (("encoder", level_of[id(mod)]) if id(mod) in level_of and mod is not network else
                                "head" if id(mod) in head_ids else "decoder")
        return owner_part[path]

    parts = _compact(list(network.state_dict()), part_of)
    levels = [parts.get(("encoder", k), []) for k in range(1, len(order) + 1)]
    levels = [level for level in levels if level]  # a level whose owners hold no state-dict key
    if len(levels) < 2 or not parts.get("head"):
        raise _fail(network, "its encoder levels or head hold no parameters or buffers")
    return ArchLayout(arch, levels, stages, parts["head"], names[id(penultimate.module)])
