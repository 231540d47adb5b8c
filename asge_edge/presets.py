"""Architectures as layer lists: the presets and the user's own.

Contract: ``layer_list(arch)`` turns ``arch`` (``--model``), a preset name or a layer
list such as ``"16,32,P,32,64,P,64"``, into ((out_channels, pool_after), ...) at width 1:
each number is one ASGE layer (conv3x3, ReLU) of that many channels, and each ``P`` a
2x2 pool (of ModelConfig.pool's kind) after the layer before it, as in torchvision's VGG
configurations. Anything else raises ValueError with one line that says what to write.
``canonical(arch)`` is the form a run keeps in config.json (layer_list's, written back),
so that one list typed two ways is one setting. Pure functions: no torch, no I/O.

Presets. The paper gives VGG8 as 7 convs + a linear classifier with C_l in
{128, 256, 512} and partitions {4, 2, 1} at alpha=1 (Table 1), but not the list.
Its Table 3 pins it further: Fusion over layers 2..7 stores 1.25 MiB of GAP
features at batch 128 (2560 fp32 per sample) and Last 0.25 MiB (512), so layers
2..7 carry 2560 channels: 256+256+512+512+512+512, and layer 1 has 128. Pools
follow VGG8B of Nokland & Eidnes (2019), the local-learning VGG8 the paper cites:
after the second, fourth and sixth conv. VGG11 is not pinned by the paper; ours
is VGG11's conv stack (8 convs) widened to 10 local layers of 128/256/512.
"""

from __future__ import annotations

Layers = tuple[tuple[int, bool], ...]   # (out_channels, pool_after) per conv layer, at width 1

PRESETS: dict[str, Layers] = {
    "vgg8": ((128, False), (256, True), (256, False), (512, True), (512, False), (512, True), (512, False)),
    "vgg11": (
        (128, False), (128, True), (256, False), (256, True), (512, False),
        (512, False), (512, True), (512, False), (512, False), (512, False),
    ),
}
POOL = "P"
EXAMPLE = "16,32,P,32,64,P,64"


def _wrong(arch: str, why: str) -> ValueError:
    return ValueError(f"model {arch!r}: {why}; give {', '.join(PRESETS)} or a layer list such as {EXAMPLE} "
                      f"(conv channels at width 1, {POOL} a 2x2 pool)")


def canonical(arch: str) -> str:
    """``arch`` as config.json keeps it: a preset's name, or the list written back from
    layer_list (no spaces or leading zeros, upper-case P). Raises ValueError where ``arch``
    is neither."""
    layers = layer_list(arch)
    return arch if arch in PRESETS else ",".join(f"{c},{POOL}" if pool else str(c) for c, pool in layers)


def layer_list(arch: str) -> Layers:
    """((out_channels, pool_after), ...) at width 1 of a preset or a layer list (module docstring)."""
    if arch in PRESETS:
        return PRESETS[arch]
    layers: list[tuple[int, bool]] = []
    for token in (t.strip() for t in arch.split(",")):
        if token.upper() == POOL:
            if not layers or layers[-1][1]:
                raise _wrong(arch, f"each {POOL} must follow a conv layer's channel count")
            layers[-1] = (layers[-1][0], True)
        elif token.isascii() and token.isdigit() and int(token) > 0:
            layers.append((int(token), False))
        elif "," in arch:
            raise _wrong(arch, f"{token!r} is neither a channel count (>= 1) nor {POOL}")
        else:
            raise _wrong(arch, "it is neither a preset nor a layer list")
    return tuple(layers)
