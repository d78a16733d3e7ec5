"""Face embedding backbones: the IResNet family used by arcface_torch (r18/r34/r50/r100), or any timm model.

IResNet = pre-activation-style residual units (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a
projection shortcut) on a stride-1 stem, four stride-2 stages, then BN -> dropout -> flatten -> Linear ->
BN1d (the "features" layer whose scale is frozen).  ``width`` scales the channel counts (64 = the
published nets; a small width makes a CPU-sized model for tests and the glyph benchmark).
"""

from __future__ import annotations

from torch import nn

__all__ = ["IResNet", "iresnet", "get_model", "LAYERS"]

#: units per stage of the published IResNets
LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


class _Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin, eps=1e-5),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))
        )

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """Input (B, in_chans, S, S) with S divisible by 16 -> embedding (B, embedding_size)."""

    def __init__(
        self,
        layers: tuple[int, ...],
        embedding_size: int = 512,
        width: int = 64,
        input_size: int = 112,
        in_chans: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be divisible by 16 (4 stride-2 stages), got {input_size}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width, eps=1e-5), nn.PReLU(width)
        )
        stages, cin = [], width
        for n, cout in zip(layers, widths):
            units = [_Unit(cin, cout, 2)] + [_Unit(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        side = input_size // 16
        self.bn = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = self.dropout(self.bn(x).flatten(1))
        return self.features(self.fc(x))


def iresnet(name: str, **kw) -> IResNet:
    if name not in LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; choose from {sorted(LAYERS)}")
    return IResNet(LAYERS[name], **kw)


def get_model(
    name: str,
    embedding_size: int = 512,
    input_size: int = 112,
    in_chans: int = 3,
    width: int = 64,
    dropout: float = 0.0,
) -> nn.Module:
    """``r18|r34|r50|r100|r200`` (IResNet) or ``timm:NAME`` (any timm model with an ``embedding_size`` head)."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=embedding_size, in_chans=in_chans)
    return iresnet(
        name,
        embedding_size=embedding_size,
        width=width,
        input_size=input_size,
        in_chans=in_chans,
        dropout=dropout,
    )
