"""TinyViT image encoder with MobileSAM's `vit_t` layout (state_dict keys match the official checkpoint).

Layout: a convolutional patch embedding (stride 4), one stage of MBConv blocks, then three stages of
windowed-attention blocks, joined by PatchMerging convolutions (strides 2, 2, 1: output stride 16),
and SAM's neck. Between the attention stages, feature maps travel channel-last (B x H x W x C), so
no spatial size is hard-coded: any input size that is a multiple of 16 gives B x 256 x S/16 x S/16.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer_norm_2d import LayerNorm2d, channels_last_weights
from .saved_tensors import cast_for_matmul, same_autocast, saved_as_recipe
from .windows import WindowSpan, assemble, needs_padding, span_keys, span_queries, window_spans


class Conv2dBN(nn.Module):
    """Conv2d without bias (`c`) followed by BatchNorm2d (`bn`).

    With `bn` in eval mode (inference, and frozen BatchNorm in training) the normalisation is a fixed
    per-channel affine map, folded into the convolution's weight and bias: one pass over the feature
    map instead of two, and no normalisation input kept for backward. Gradients still reach every
    parameter that wants one (the fold is differentiable).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight_init: float = 1.0):
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.folds():
            return self.bn(self.c(x))
        weight, bias = self.folded()
        conv = (self.c.stride, self.c.padding, self.c.dilation, self.c.groups)
        if x.requires_grad and not weight.requires_grad and not bias.requires_grad and torch.is_grad_enabled():
            return FrozenConv2d.apply(x, weight, bias, *conv)
        return F.conv2d(x, weight, bias, *conv)

    def activated(self, x: Tensor) -> Tensor:
        """gelu(self(x)). Where nothing needs a gradient (the frozen prefix, inference) on a CPU in float32, one
        oneDNN kernel with GELU fused into the convolution: the GELU of the convolution's output in memory
        cost more than the convolution itself (MobileSAM's stage-0 depthwise conv at 256 px, batch 4:
        8 ms, its GELU after it 33 ms, both fused 17 ms)."""
        if not (self.folds() and fusable_on_cpu(x)):
            return F.gelu(self(x))
        weight, bias = self.folded()
        c = self.c
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, c.padding, c.stride, c.dilation, c.groups,
                                                       "gelu", [], "none")

    def folds(self) -> bool:
        """Whether BatchNorm folds into the convolution: eval mode, and `c` not wrapped (LoRA on convs)."""
        return not self.bn.training and type(self.c) is nn.Conv2d

    def folded(self) -> tuple[Tensor, Tensor]:
        """The convolution's weight and bias with eval-mode BatchNorm folded in."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return self.c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def fusable_on_cpu(x: Tensor) -> bool:
    """Whether a no-gradient float32 CPU computation on `x` may take oneDNN's fused kernels (not while
    tracing or exporting a graph, which must hold the plain operators)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()
            and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()))


class FrozenConv2d(torch.autograd.Function):
    """`conv2d(x, weight, bias)` for a weight and bias that need no gradient, keeping only the weight for
    backward: the input's gradient needs no input, but autograd's convolution keeps it anyway (on LiteMedSAM
    at 256 px, batch 2, the frozen depthwise and patch-merging convolutions of a LoRA step kept 150 MB).
    Under autocast the inputs are cast as autocast casts a convolution's, and the gradient is taken in that
    dtype. Backward hands the kernel an uninitialised tensor with the input's shape and strides, which it
    never reads: it picks its algorithm by that layout (with torch's stride-0 placeholder,
    `torch.nn.grad.conv2d_input`, the channels-last backward ran 1.5-3.5x slower here)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, stride, padding, dilation, groups: int) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight = weight.to(dtype)
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, x.stride(), x.dtype, stride, padding, dilation, groups)
        with torch.autocast(device, enabled=False):
            return F.conv2d(x.to(dtype), weight, bias.to(dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        shape, strides, dtype, stride, padding, dilation, groups = ctx.conv
        grad = grad.to(weight.dtype)
        layout = torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device)  # never read
        grad_x = torch.ops.aten.convolution_backward(grad, layout, weight, None, stride, padding, dilation, False,
                                                     [0, 0], groups, (True, False, False))[0]
        return grad_x.to(dtype), None, None, None, None, None, None


class PatchEmbed(nn.Module):
    """Two Conv2dBN with GELU between: B x 3 x S x S -> B x dim x S/stride x S/stride.

    stride 4: two 3x3 stride-2 convs (MobileSAM); stride 1: two 1x1 stride-1 convs (LiteMedSAM).
    """

    def __init__(self, in_chans: int, dim: int, stride: int = 4):
        super().__init__()
        if stride not in (1, 4):
            raise ValueError(f"the patch embedding has stride 4 (MobileSAM) or 1 (LiteMedSAM), not {stride}")
        kernel, step = (3, 2) if stride == 4 else (1, 1)
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2, kernel, step), nn.GELU(),
                                 Conv2dBN(dim // 2, dim, kernel, step))  # seq[1]'s GELU runs in seq[0].activated

    def forward(self, x: Tensor) -> Tensor:
        return self.seq[2](self.seq[0].activated(x))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual add, GELU (B x C x H x W)."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.conv2.activated(self.conv1.activated(x)))
        return F.gelu(x + y)


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv with `stride`, 1x1 conv: B x C x H x W -> B x H' x W' x out_dim."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3(self.conv2.activated(self.conv1.activated(x)))
        return x.permute(0, 2, 3, 1)


# below this many padded tokens per real one, the official padded windows: there the real-token spans' extra
# kernels and copies cost what the few padded queries save (LiteMedSAM at 256 px, 8-20% padding: no faster,
# and 100 MB more at the peak of a batch-2 LoRA step)
LEAN_ABOVE = 1.5


class WindowAttention(nn.Module):
    """Pre-normed multi-head attention inside zero-padded ws x ws windows of a B x H x W x C grid, with a
    learned relative-position bias. Where padding would add half the tokens or more (MobileSAM at 256 px:
    16 x 16 grids in 14 x 14 and 7 x 7 windows), `qkv` and `proj` run on the real tokens and only they ask
    queries (models/windows.py; a padding token is normed to the LayerNorm's bias before `qkv`).

    `qkv` is laid out per head as [q | k | v] (tokens x heads x 3*head_dim). The bias for tokens p, q is
    `attention_biases[:, |dy|*ws + |dx|]`; it is gathered at every forward, so it never goes stale
    (`index_select` on the flat index: 2.6x faster than indexing with the 2-D one, 0.14 against 0.36 ms
    for MobileSAM's 14 x 14 windows, 5 heads, on the 2-core CPU).

    Kernel choice (CPU, 2 threads, these window shapes): torch takes its fused flash kernel only with a
    4-D mask and a mask that needs no gradient. In float32 that kernel was 1.4-2.4x faster than the math
    path for forward + backward and keeps no attention matrix for backward. In bf16 it was 1.4-3x slower
    for forward + backward, but 4-5x faster for a forward without gradient (LiteMedSAM's first stage at
    256 px, batch 4: 78 against 374 ms); so bf16 on a CPU passes a 3-D mask (the math path) only when
    backward will need the attention.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        index = (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B x H x W x C) -> same shape."""
        height, width, side = x.shape[1], x.shape[2], self.window_size
        padded = (height + -height % side, width + -width % side)
        if padded[0] * padded[1] < LEAN_ABOVE * height * width:
            return self.attend_padded_windows(x, padded)
        return self.attend_real_tokens(x)

    def attend_padded_windows(self, x: Tensor, padded: tuple[int, int]) -> Tensor:
        """The official computation: the grid zero-padded and cut into windows before the norm, every token
        asking queries, the padding cropped away at the end."""
        batch, height, width, dim = x.shape
        side, rows, cols = self.window_size, padded[0] // self.window_size, padded[1] // self.window_size
        x = F.pad(x, (0, 0, 0, padded[1] - width, 0, padded[0] - height))
        windows = x.view(batch, rows, side, cols, side, dim).transpose(2, 3).reshape(-1, side * side, dim)
        qkv = self.projected(windows)
        whole = WindowSpan(0, side, 0, side, side)
        attended = self.attend(*qkv.split([self.head_dim, 2 * self.head_dim], dim=-1), self.gathered_bias(), whole)
        merged = attended.transpose(1, 2).reshape(len(windows), side * side, dim)
        with saved_as_recipe(merged, lambda: attended.transpose(1, 2).reshape(len(windows), side * side, dim)):
            out = self.proj(merged)
        out = out.view(batch, rows, cols, side, side, dim).transpose(2, 3).reshape(batch, *padded, dim)
        return out[:, :height, :width]

    def projected(self, tokens: Tensor) -> Tensor:
        """`qkv` of the normed tokens (... x C -> ... x heads x 3*head_dim), the normed input kept as a recipe."""
        normed = cast_for_matmul(self.norm(tokens))
        dtype = normed.dtype  # the recipe must not hold `normed` itself
        with saved_as_recipe(normed, lambda: self.norm(tokens).to(dtype)):
            return self.qkv(normed).view(*tokens.shape[:-1], self.num_heads, 3 * self.head_dim)

    def gathered_bias(self) -> Tensor:
        """heads x ws x ws (query position) x ws*ws (key position)."""
        side = self.window_size
        return self.attention_biases.index_select(1, self.attention_bias_idxs.view(-1)).view(self.num_heads, side, side, -1)

    def attend_real_tokens(self, x: Tensor) -> Tensor:
        """Only the real tokens normed, projected and asking queries (class docstring)."""
        batch, height, width, dim = x.shape
        heads, head_dim, side = self.num_heads, self.head_dim, self.window_size
        qkv = self.projected(x)
        q, kv = qkv.split([head_dim, 2 * head_dim], dim=-1)  # B x H x W x heads x head_dim (2 * head_dim)
        padding = None
        if needs_padding(height, width, side):
            zero = cast_for_matmul(self.norm(x.new_zeros(1, dim)))
            padding = self.qkv(zero).view(heads, 3 * head_dim)[:, head_dim:]
        spans = window_spans(height, width, side)
        bias = self.gathered_bias()
        attended = [[self.attend(span_queries(q, span), span_keys(kv, padding, span), bias, span) for span in row]
                    for row in spans]

        def merged_heads() -> Tensor:
            return assemble([[out.transpose(1, 2) for out in row] for row in attended], spans, batch).flatten(3)

        merged = merged_heads()
        with saved_as_recipe(merged, merged_heads):  # rebuilt from the attention outputs the kernel keeps
            return self.proj(merged)

    def attend(self, queries: Tensor, keys: Tensor, bias: Tensor, span: WindowSpan) -> Tensor:
        """(n x Q x heads x head_dim) queries over (n x ws*ws x heads x 2*head_dim) keys and values, the queries
        at the top left of their windows (`span.query_grid`); `bias`: heads x ws x ws x ws*ws -> n x heads x Q x
        head_dim."""
        q = queries.transpose(1, 2)
        k, v = keys.transpose(1, 2).split(self.head_dim, dim=-1)
        rows, cols = span.query_grid
        bias = bias[:, :rows, :cols].reshape(self.num_heads, q.shape[2], -1).to(q.dtype)
        if q.dtype == torch.float32 or q.device.type != "cpu" or not q.requires_grad:
            bias = bias[None]  # 4-D: the fused kernel (class docstring)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Mlp(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2. The normed input (cast once for autocast) and the GELU output, which
    fc1 / fc2 (or their LoRA branches) save for backward, are recomputed from what LayerNorm and GELU save
    (saved_tensors).

    `recompute_hidden` (off by default; `enable_mlp_recompute`): fc1's output, which GELU saves, is not kept
    either, so only LayerNorm's input remains. fc1 then runs once more in backward: rebuilt when fc2's
    backward asks for the GELU output, and handed on to GELU's backward, which runs next.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.recompute_hidden = False

    def forward(self, x: Tensor) -> Tensor:
        normed = cast_for_matmul(self.norm(x))
        dtype = normed.dtype  # the recipes must not hold `normed` itself (nor `hidden` when it is recomputed)
        with saved_as_recipe(normed, lambda: self.norm(x).to(dtype)):
            hidden = self.fc1(normed)
        if not self.recompute_hidden:
            activated = self.act(hidden)
            with saved_as_recipe(activated, lambda: self.act(hidden)):
                return self.fc2(activated)
        autocast_now = same_autocast(x.device.type)
        rebuilt: dict[str, Tensor] = {}

        def rebuild_hidden() -> Tensor:
            with autocast_now():
                return self.fc1(self.norm(x).to(dtype))

        def rebuild_activated() -> Tensor:
            rebuilt["hidden"] = rebuild_hidden()
            return self.act(rebuilt["hidden"])

        with saved_as_recipe(hidden, lambda: rebuilt.pop("hidden") if rebuilt else rebuild_hidden()):
            activated = self.act(hidden)
        with saved_as_recipe(activated, rebuild_activated):
            return self.fc2(activated)


class TinyViTBlock(nn.Module):
    """x + attn(x) (zero-padded windows), depthwise local_conv, x + mlp(x); B x H x W x C."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int):
        super().__init__()
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on B x C x H x W, then PatchMerging (returns B x H' x W' x C')."""

    def __init__(self, dim: int, out_dim: int, depth: int, expand_ratio: float, merge_stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, merge_stride)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """Attention stage: TinyViT blocks on B x H x W x C, then an optional PatchMerging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int, out_dim: int | None = None, merge_stride: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size)
                                    for _ in range(depth))
        self.downsample = None if out_dim is None else PatchMerging(dim, out_dim, merge_stride)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x.permute(0, 3, 1, 2))


class TinyViT(nn.Module):
    """MobileSAM's TinyViT-5M encoder: B x 3 x S x S (normalised) -> B x out_chans x S/stride x S/stride.

    `stem_stride` 4 gives MobileSAM's encoder (stride 16), 1 LiteMedSAM's (stride 4: 256 px -> 64 x 64).
    `norm_head` / `head` (the ImageNet classifier, `classifier_head=True`) are never used; they exist so
    that MobileSAM's checkpoint loads strictly (LiteMedSAM's has none). `merge_strides` are the
    PatchMerging strides (official: 2, 2, 1).
    """

    def __init__(self, image_size: int = 1024, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (2, 4, 5, 10),
                 window_sizes: Sequence[int] = (7, 7, 14, 7), mlp_ratio: float = 4.0,
                 mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3, merge_strides: Sequence[int] = (2, 2, 1),
                 stem_stride: int = 4, classifier_head: bool = True, num_classes: int = 1000, out_chans: int = 256):
        super().__init__()
        stages = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == stages == len(merge_strides) + 1):
            raise ValueError("embed_dims, depths, num_heads, window_sizes need one entry per stage and "
                             "merge_strides one fewer")
        stride = stem_stride
        for s in merge_strides:
            stride *= s
        if image_size % stride:
            raise ValueError(f"image_size {image_size} is not a multiple of the encoder stride {stride}")
        self.image_size = image_size
        self.stride = stride
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], stem_stride)
        layers: list[nn.Module] = [ConvLayer(embed_dims[0], embed_dims[1], depths[0], mbconv_expand_ratio,
                                             merge_strides[0])]
        for i in range(1, stages):
            last = i == stages - 1
            layers.append(BasicLayer(embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                     local_conv_size, out_dim=None if last else embed_dims[i + 1],
                                     merge_stride=1 if last else merge_strides[i]))
        self.layers = nn.ModuleList(layers)
        if classifier_head:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = channels_last_weights(nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans)))
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x.permute(0, 3, 1, 2))


def _init_weights(module: nn.Module) -> None:
    """TinyViT's init for Linear and LayerNorm (convs and BatchNorm keep theirs)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
