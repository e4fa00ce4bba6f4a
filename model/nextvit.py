"""Next-ViT reference model (PyTorch).

Paper: "Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic Industrial
Scenarios", arXiv 2207.05501 (ByteDance). The computation follows the official release
(github.com/bytedance/Next-ViT, ``classification/nextvit.py``): BatchNorm eps 1e-5, ReLU, head dim 32,
spatial reduction by AvgPool1d over the flattened token sequence followed by BatchNorm1d, attention
logits scaled *after* ``q @ k^T``. Parameter names follow timm (``stages.i.blocks.j``, ``head.fc``), so
timm checkpoints load as they are and official ones are remapped by name in ``checkpoint.py``.

Every block owns an idempotent ``reparameterize()`` that folds its BatchNorms into a neighbouring
linear operator (the "deploy form"); ``nextvit_deploy.fuse.fuse_model`` walks a copy of the model and
calls it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "NextViT",
    "VariantCfg",
    "VARIANTS",
    "InputSizeError",
    "resolve_variant",
    "stage_resolutions",
    "check_input_size",
    "min_input_size",
]

NORM_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputSizeError(ValueError):
    """The input's height/width cannot be processed by Next-ViT."""


class UnknownVariantError(ValueError):
    """A variant name that is neither a canonical name nor an alias; the message lists the choices."""


# --------------------------------------------------------------------------------------------------
# Helpers: BatchNorm algebra shared by every block's reparameterize().
# --------------------------------------------------------------------------------------------------
def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, shift) such that eval-mode ``bn(x) == x * scale + shift`` per channel."""
    if isinstance(bn, ChannelAffine):
        return bn.scale.detach().clone(), bn.shift.detach().clone()
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm, got {type(bn).__name__}")
    if not bn.track_running_stats or bn.running_var is None or bn.running_mean is None or not bn.affine:
        raise ValueError("only affine BatchNorm with running statistics can be folded")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale.detach(), shift.detach()


def _weight_as_matrix_view(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):
        if weight.shape[2:] != (1, 1) or layer.groups != 1:
            raise ValueError("a pre-norm can only be folded into a dense 1x1 convolution")
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight


@torch.no_grad()
def fold_norm_after(layer: nn.Conv2d | nn.Linear, norm: nn.Module) -> None:
    """Fold ``norm(layer(x))`` into ``layer`` (Conv2d or Linear followed by a per-channel norm)."""
    scale, shift = bn_scale_shift(norm)
    weight = layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    layer.weight = nn.Parameter(weight)
    layer.bias = nn.Parameter(bias * scale + shift)


@torch.no_grad()
def fold_norm_before(layer: nn.Conv2d | nn.Linear, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold a per-input-channel affine ``x * scale + shift`` that precedes ``layer`` into it."""
    matrix = _weight_as_matrix_view(layer)
    bias = layer.bias if layer.bias is not None else matrix.new_zeros(matrix.shape[0])
    new_bias = bias + matrix @ shift
    new_weight = (matrix * scale.reshape(1, -1)).reshape(layer.weight.shape)
    layer.weight = nn.Parameter(new_weight)
    layer.bias = nn.Parameter(new_bias)


def compose_affine(first: tuple[torch.Tensor, torch.Tensor],
                   second: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine map equal to applying ``first`` then ``second`` (both per channel)."""
    (s1, t1), (s2, t2) = first, second
    return s1 * s2, t1 * s2 + t2


class ChannelAffine(nn.Module):
    """Per-channel ``x * scale + shift`` on NCHW: what an output BatchNorm becomes in the deploy form."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(1, -1, 1, 1) + self.shift.reshape(1, -1, 1, 1)


def _make_divisible(value: float, divisor: int) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


# --------------------------------------------------------------------------------------------------
# Building blocks, bottom-up.
# --------------------------------------------------------------------------------------------------
class ConvNormAct(nn.Module):
    """3x3 Conv -> BatchNorm -> ReLU (the stem)."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(out_chs, eps=NORM_EPS)
        self.act = nn.ReLU()
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self) -> int:
        if self.is_fused:
            return 0
        fold_norm_after(self.conv, self.norm)
        self.norm = nn.Identity()
        self.is_fused = True
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """Optional 2x2 ceil-mode average pool (stride 2), then 1x1 Conv -> BatchNorm when channels change."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1):
        super().__init__()
        if stride == 2:
            self.pool: nn.Module = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        if stride == 2 or in_chs != out_chs:
            self.conv: nn.Module = nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False)
            self.norm: nn.Module = nn.BatchNorm2d(out_chs, eps=NORM_EPS)
        else:
            self.conv = nn.Identity()
            self.norm = nn.Identity()
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self) -> int:
        if self.is_fused or isinstance(self.norm, nn.Identity):
            self.is_fused = True
            return 0
        assert isinstance(self.conv, nn.Conv2d)
        fold_norm_after(self.conv, self.norm)
        self.norm = nn.Identity()
        self.is_fused = True
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.pool(x)))


class ConvAttention(nn.Module):
    """Multi-Head Convolutional Attention (MHCA): grouped 3x3 conv -> BN -> ReLU -> 1x1 projection."""

    def __init__(self, out_chs: int, *, head_dim: int):
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(out_chs, out_chs, kernel_size=3, padding=1,
                                       groups=out_chs // head_dim, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(out_chs, eps=NORM_EPS)
        self.act = nn.ReLU()
        self.projection = nn.Conv2d(out_chs, out_chs, kernel_size=1, bias=False)
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self) -> int:
        if self.is_fused:
            return 0
        fold_norm_after(self.group_conv3x3, self.norm)
        self.norm = nn.Identity()
        self.is_fused = True
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class ConvMlp(nn.Module):
    """1x1 Conv -> ReLU -> 1x1 Conv; hidden width rounded to a multiple of 32 as in the official code."""

    def __init__(self, chs: int, *, mlp_ratio: float):
        super().__init__()
        hidden = _make_divisible(chs * mlp_ratio, 32)
        self.fc1 = nn.Conv2d(chs, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, chs, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NextConvBlock(nn.Module):
    """Next Convolution Block (NCB): patch embed, x + MHCA(x), x + MLP(BN(x))."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, head_dim: int = 32,
                 mlp_ratio: float = 3.0):
        super().__init__()
        if out_chs % head_dim:
            raise ValueError(f"out_chs={out_chs} must be a multiple of head_dim={head_dim}")
        self.patch_embed = PatchEmbed(in_chs, out_chs, stride=stride)
        self.mhca = ConvAttention(out_chs, head_dim=head_dim)
        self.norm: nn.Module = nn.BatchNorm2d(out_chs, eps=NORM_EPS)
        self.mlp = ConvMlp(out_chs, mlp_ratio=mlp_ratio)
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self) -> int:
        if self.is_fused:
            return 0
        folded = self.patch_embed.reparameterize() + self.mhca.reparameterize()
        fold_norm_before(self.mlp.fc1, *bn_scale_shift(self.norm))
        self.norm = nn.Identity()
        self.is_fused = True
        return folded + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.mhca(x)
        return x + self.mlp(self.norm(x))


class EfficientAttention(nn.Module):
    """Efficient Multi-Head Self Attention (E-MHSA) over a (B, N, C) token sequence.

    With ``sr_ratio > 1`` keys and values come from tokens average-pooled by ``sr_ratio**2`` along the
    flattened sequence (AvgPool1d), then normalised by BatchNorm1d, as in the official release.
    """

    def __init__(self, dim: int, *, head_dim: int = 32, sr_ratio: int = 1):
        super().__init__()
        self.dim = dim
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        self.pool_size = sr_ratio ** 2
        if sr_ratio > 1:
            self.sr: nn.Module | None = nn.AvgPool1d(kernel_size=self.pool_size, stride=self.pool_size)
            self.norm: nn.Module | None = nn.BatchNorm1d(dim, eps=NORM_EPS)
        else:
            self.sr = None
            self.norm = None

    def _heads(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.reshape(batch, -1, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, chs = x.shape
        q = self._heads(self.q(x), batch)
        if self.sr is not None:
            kv_in = self.sr(x.transpose(1, 2))
            if self.norm is not None:
                kv_in = self.norm(kv_in)
            kv_in = kv_in.transpose(1, 2)
        else:
            kv_in = x
        k = self._heads(self.k(kv_in), batch)
        v = self._heads(self.v(kv_in), batch)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, chs)
        return self.proj(out)


class NextTransformerBlock(nn.Module):
    """Next Transformer Block (NTB): E-MHSA on 75% of the channels, MHCA on the rest, then an MLP."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, sr_ratio: int = 1,
                 mlp_ratio: float = 2.0, head_dim: int = 32, mix_block_ratio: float = 0.75):
        super().__init__()
        self.mhsa_out_chs = _make_divisible(int(out_chs * mix_block_ratio), 32)
        self.mhca_out_chs = out_chs - self.mhsa_out_chs
        self.patch_embed = PatchEmbed(in_chs, self.mhsa_out_chs, stride=stride)
        self.norm1: nn.Module = nn.BatchNorm2d(self.mhsa_out_chs, eps=NORM_EPS)
        self.e_mhsa = EfficientAttention(self.mhsa_out_chs, head_dim=head_dim, sr_ratio=sr_ratio)
        self.projection = PatchEmbed(self.mhsa_out_chs, self.mhca_out_chs, stride=1)
        self.mhca = ConvAttention(self.mhca_out_chs, head_dim=head_dim)
        self.norm2: nn.Module = nn.BatchNorm2d(out_chs, eps=NORM_EPS)
        self.mlp = ConvMlp(out_chs, mlp_ratio=mlp_ratio)
        self.is_fused = False

    @torch.no_grad()
    def reparameterize(self) -> int:
        if self.is_fused:
            return 0
        folded = (self.patch_embed.reparameterize() + self.projection.reparameterize()
                  + self.mhca.reparameterize())
        attn = self.e_mhsa
        pre = bn_scale_shift(self.norm1)
        fold_norm_before(attn.q, *pre)
        # Average pooling commutes with a per-channel affine map, so norm1 and the BatchNorm1d after
        # the spatial-reduction pool compose into one affine map in front of k and v.
        kv = compose_affine(pre, bn_scale_shift(attn.norm)) if attn.norm is not None else pre
        fold_norm_before(attn.k, *kv)
        fold_norm_before(attn.v, *kv)
        folded += 2 if attn.norm is not None else 1
        attn.norm = None
        self.norm1 = nn.Identity()
        fold_norm_before(self.mlp.fc1, *bn_scale_shift(self.norm2))
        self.norm2 = nn.Identity()
        self.is_fused = True
        return folded + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        batch, chs, height, width = x.shape
        out = self.norm1(x).reshape(batch, chs, height * width).transpose(1, 2)
        out = self.e_mhsa(out)
        x = x + out.transpose(1, 2).reshape(batch, chs, height, width)
        out = self.projection(x)
        out = out + self.mhca(out)
        x = torch.cat([x, out], dim=1)
        return x + self.mlp(self.norm2(x))


class NextStage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool -> Linear. Named ``head.fc`` like timm."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------------
# The model and its variants.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantCfg:
    """Architecture and preprocessing facts of one Next-ViT variant (kept next to each other)."""

    name: str
    depths: tuple[int, int, int, int]
    params_m: float  # published parameter count (millions), classifier with 1000 classes
    stem_chs: tuple[int, int, int] = (64, 32, 64)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    head_dim: int = 32
    mix_block_ratio: float = 0.75
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.95  # timm's default cfg for nextvit_*.bd_in1k
    interpolation: str = "bicubic"
    aliases: tuple[str, ...] = field(default=())


VARIANTS: dict[str, VariantCfg] = {
    "nextvit_small": VariantCfg("nextvit_small", (3, 4, 10, 3), 31.76, aliases=("s", "small", "next-vit-s")),
    "nextvit_base": VariantCfg("nextvit_base", (3, 4, 20, 3), 44.82, aliases=("b", "base", "next-vit-b")),
    "nextvit_large": VariantCfg("nextvit_large", (3, 4, 30, 3), 57.87, aliases=("l", "large", "next-vit-l")),
}


def resolve_variant(name: str) -> VariantCfg:
    """Look a variant up by canonical name or alias (``s``, ``small``, ``Next-ViT-S``)."""
    key = name.strip().lower()
    for cfg in VARIANTS.values():
        if key == cfg.name or key in cfg.aliases:
            return cfg
    import difflib

    choices = list(VARIANTS) + [a for c in VARIANTS.values() for a in c.aliases]
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownVariantError(f"unknown variant {name!r}{hint}; choose one of: {', '.join(VARIANTS)}")


def stage_resolutions(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of the four stage outputs (strides 4, 8, 16, 32) for an input of ``height x width``."""

    def conv_s2(n: int) -> int:  # 3x3, stride 2, padding 1
        return (n - 1) // 2 + 1

    h, w = conv_s2(conv_s2(height)), conv_s2(conv_s2(width))
    sizes = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)  # 2x2 ceil-mode average pool
        sizes.append((h, w))
    return sizes


def _fits(height: int, width: int, sr_ratios: Sequence[int]) -> tuple[int, int, int, int] | None:
    """None when the size fits, else (stage, h, w, pooled tokens) of the first stage that does not."""
    sizes = stage_resolutions(height, width)
    for stage_idx, sr in enumerate(sr_ratios):
        h, w = sizes[stage_idx]
        # Stage 0 holds only convolution blocks; stages 1-3 end with a transformer block whose spatial
        # reduction average-pools sr**2 tokens, so it needs at least that many.
        if stage_idx > 0 and sr > 1 and h * w < sr * sr:
            return stage_idx, h, w, sr * sr
    return None


def min_input_size(sr_ratios: Sequence[int] = (8, 4, 2, 1)) -> int:
    """Smallest square input side Next-ViT can process (25 with the published reduction ratios)."""
    side = 1
    while _fits(side, side, sr_ratios) is not None:
        side += 1
    return side


def check_input_size(height: int, width: int, sr_ratios: Sequence[int] = (8, 4, 2, 1)) -> None:
    """Raise :class:`InputSizeError` when a ``height x width`` image cannot be processed."""
    if height < 1 or width < 1:
        raise InputSizeError(f"image size {height}x{width} is empty")
    bad = _fits(height, width, sr_ratios)
    if bad is not None:
        stage, h, w, pooled = bad
        need = min_input_size(sr_ratios)
        raise InputSizeError(
            f"image size {height}x{width} is too small: stage {stage} has {h}x{w}={h * w} tokens "
            f"but its spatial reduction pools {pooled}; use at least {need}x{need}")


class NextViT(nn.Module):
    """Next-ViT classifier or multi-scale backbone.

    Args:
        depths: blocks per stage, e.g. ``(3, 4, 10, 3)`` for Next-ViT-S. Stage 3 repeats a pattern of
            five blocks (four NCB, one NTB), so its depth must be a multiple of 5.
        num_classes: classifier width. Defaults to 1000.
        features_only: return the four stage feature maps (strides 4, 8, 16, 32) instead of logits.
        out_norms: with ``features_only``, normalise each stage output with its own BatchNorm, as the
            official detection/segmentation backbones do (``extra_norm_list``).
    """

    def __init__(self, depths: Sequence[int] = (3, 4, 10, 3), *, num_classes: int = 1000,
                 stem_chs: Sequence[int] = (64, 32, 64), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 head_dim: int = 32, mix_block_ratio: float = 0.75, features_only: bool = False,
                 out_norms: bool = False, in_chans: int = 3):
        super().__init__()
        if len(depths) != 4 or depths[2] % 5 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive ints with depths[2] a multiple of 5, got {tuple(depths)}")
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.in_chans = in_chans
        self.features_only = features_only
        stage_chs = [
            [96] * depths[0],
            [192] * (depths[1] - 1) + [256],
            [384, 384, 384, 384, 512] * (depths[2] // 5),
            [768] * (depths[3] - 1) + [1024],
        ]
        stage_types = [
            ["ncb"] * depths[0],
            ["ncb"] * (depths[1] - 1) + ["ntb"],
            ["ncb", "ncb", "ncb", "ncb", "ntb"] * (depths[2] // 5),
            ["ncb"] * (depths[3] - 1) + ["ntb"],
        ]
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, stem_chs[0], stride=2),
            ConvNormAct(stem_chs[0], stem_chs[1], stride=1),
            ConvNormAct(stem_chs[1], stem_chs[2], stride=1),
            ConvNormAct(stem_chs[2], stem_chs[2], stride=2),
        )
        in_chs = stem_chs[2]
        stages = []
        for stage_idx, (chs, types) in enumerate(zip(stage_chs, stage_types)):
            blocks: list[nn.Module] = []
            for block_idx, (out_chs, kind) in enumerate(zip(chs, types)):
                stride = 2 if stage_idx > 0 and block_idx == 0 else 1
                if kind == "ncb":
                    blocks.append(NextConvBlock(in_chs, out_chs, stride=stride, head_dim=head_dim))
                else:
                    blocks.append(NextTransformerBlock(in_chs, out_chs, stride=stride,
                                                       sr_ratio=sr_ratios[stage_idx], head_dim=head_dim,
                                                       mix_block_ratio=mix_block_ratio))
                in_chs = out_chs
            stages.append(NextStage(blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            {"num_chs": chs[-1], "reduction": 2 ** (i + 2), "module": f"stages.{i}"}
            for i, chs in enumerate(stage_chs)
        ]
        self.num_features = in_chs
        if features_only:
            self.out_norms: nn.ModuleList | None = (
                nn.ModuleList(nn.BatchNorm2d(c[-1], eps=NORM_EPS) for c in stage_chs) if out_norms else None)
            self.norm: nn.Module = nn.Identity()
            self.head: ClassifierHead | None = None
        else:
            self.out_norms = None
            self.norm = nn.BatchNorm2d(in_chs, eps=NORM_EPS)
            self.head = ClassifierHead(in_chs, num_classes)
        self.is_fused = False
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---- input validation --------------------------------------------------------------------------
    def check_input_size(self, height: int, width: int) -> None:
        """Raise :class:`InputSizeError` when a ``height x width`` image cannot be processed."""
        check_input_size(height, width, self.sr_ratios)

    def min_input_size(self) -> int:
        """Smallest square input side the architecture can process."""
        return min_input_size(self.sr_ratios)

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InputSizeError(
                f"expected an input of shape (batch, {self.in_chans}, height, width), got {tuple(x.shape)}")
        self.check_input_size(int(x.shape[2]), int(x.shape[3]))

    # ---- deploy form -------------------------------------------------------------------------------
    @torch.no_grad()
    def reparameterize(self) -> int:
        """Fold the final BatchNorm into the classifier and output norms into per-channel affines.

        Blocks fold their own norms (their ``reparameterize``); this handles only the model-level ones.
        Returns the number of BatchNorm layers folded. Idempotent.
        """
        if self.is_fused:
            return 0
        folded = 0
        if self.head is not None and not isinstance(self.norm, nn.Identity):
            # Global average pooling commutes with a per-channel affine map.
            fold_norm_before(self.head.fc, *bn_scale_shift(self.norm))
            self.norm = nn.Identity()
            folded += 1
        if self.out_norms is not None:
            self.out_norms = nn.ModuleList(ChannelAffine(*bn_scale_shift(n)) for n in self.out_norms)
            folded += len(self.out_norms)
        self.is_fused = True
        return folded

    # ---- forward -----------------------------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs (strides 4, 8, 16, 32), each through its output norm if it has one."""
        self._check_input(x)
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(self.out_norms[idx](x) if self.out_norms is not None else x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no classifier head")
        return self.head(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))
