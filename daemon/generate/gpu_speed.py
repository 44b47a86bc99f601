"""The I2VGen-XL UNet step, split so that a job pays once for what does not change between denoising steps.

Why: the stock `I2VGenXLUNet.forward` recomputes, at every one of the 50 steps, the fps embedding, the whole
context (text + image-latent + CLIP-image embeddings) and the temporal encoder over the image latents, none of which
depends on the step. `prepare` computes them once per job with the very same operations, and `step` runs the rest
of `forward` (diffusers 0.42.1) unchanged, so in eager mode the result is bit-for-bit `unet(...)`
(tests/integration/test_generate_batch.py). `step` also gives the DeepCache-style fast mode its two entry points:
a full pass that keeps the deep feature, and a shallow pass that reuses it.

With classifier-free guidance the two halves of the batch (unconditional, conditional) differ only in the context,
which the UNet first reads in the first down block's first cross-attention. Everything before it (the input
convolution, the input temporal transformer, the first resnet and temporal convolution) sees the same latents, image
latents, timestep and fps in both halves, so `step(..., guided=True)` runs that part once per job and repeats its
output for the two halves: the same operations on the same inputs, 1.14 of the 41.9 TFLOP of a 512x512x16 guided
step (2.7%) not computed twice.

Attention (`AttentionProcessor`, installed on CUDA): heads that are not a multiple of 8 wide (the image-latent
temporal encoder's) are zero-padded to the next multiple of 8 with the softmax scale of the true width, so that the
fused kernels take them: zero columns add nothing to q.k and produce zero outputs that are cut off again, so the
maths is unchanged; only the kernel (and its rounding) differs. Short sequences (the temporal attention over the
frames: 16 queries and keys per pixel, 2-10 calls per step at each level) go to the memory-efficient kernel, which
the default dispatch passes over for cuDNN's: on an H200 at 512x512x16 it takes 0.47 vs 0.68 ms for the largest
such call and 4.6 ms less per step in all (`bench/gpu_bench.py --phases attn`, BENCHMARKS.md). Sequences of up
to 16 frames are also packed four at a time into one 64-token sequence under a block-diagonal mask
(`packed_attention`, same maths), which fills the kernel's query tiles: 0.27 instead of 0.47 ms for that call,
3.4 ms less per step. The long spatial and cross attentions are fastest with the default (cuDNN) kernel and
keep it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

HEAD_ALIGN = 8
SHORT_SEQUENCE = 32
"""Query and key lengths up to this (frames) take the memory-efficient kernel on CUDA."""
PACK_UP_TO = 16
"""Self-attentions over up to this many frames are packed (`packed_attention`) for that kernel ..."""
PACKED_LENGTH = 64
"""... `PACKED_LENGTH // frames` sequences side by side (H200, 512x512x16: 3.4 ms less per step; at 32 frames
two at a time gained nothing, BENCHMARKS.md) ..."""
PACK_MIN_BATCH = 512
"""... where there are at least this many sequences (the 128 of the 8x8 level took 0.154 ms packed, 0.054 not)."""
KERNEL_BATCH_LIMIT = 65535
"""The memory-efficient kernel launches one grid row per batch entry, and CUDA allows 65535 of them (pytorch
issue 146704): at 1024p a batch of two already has 2 x 2 x 128 x 128 = 65536 temporal sequences."""


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`scaled_dot_product_attention` of (B, H, S, D) tensors, heads zero-padded to a multiple of 8 (same maths),
    short sequences on CUDA through the memory-efficient kernel, the shortest packed (see the module's
    docstring)."""
    width = query.shape[-1]
    pad = (-width) % HEAD_ALIGN
    if pad:
        query, key, value = (F.pad(tensor, (0, pad)) for tensor in (query, key, value))
    scale = width**-0.5 if pad else None  # None: the kernels' own 1/sqrt(width), as the stock processor has it
    if query.is_cuda and takes_efficient_kernel(query.shape[-2], key.shape[-2]):
        group = pack_group(query.shape[0], query.shape[-2], key.shape[-2])
        if group > 1:
            out = packed_attention(query, key, value, scale, group, _efficient_masked)
        else:
            out = in_batches(_efficient_attention, query, key, value, scale, KERNEL_BATCH_LIMIT)
    else:
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
    return out[..., :width] if pad else out


def takes_efficient_kernel(query_length: int, key_length: int) -> bool:
    """Whether `attention` sends a call with these sequence lengths to the memory-efficient kernel on CUDA."""
    return query_length <= SHORT_SEQUENCE and key_length <= SHORT_SEQUENCE


def pack_group(batch: int, query_length: int, key_length: int) -> int:
    """How many sequences `attention` packs into one on CUDA (1: none): self-attentions of up to `PACK_UP_TO`
    tokens over at least `PACK_MIN_BATCH` sequences, `PACKED_LENGTH // length` at a time where that divides them."""
    if query_length != key_length or query_length > PACK_UP_TO or batch < PACK_MIN_BATCH:
        return 1
    group = PACKED_LENGTH // query_length
    return 1 if batch % group else group


MaskedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None, torch.Tensor], torch.Tensor]


def _sdpa_masked(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, mask: torch.Tensor
) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    group: int,
    kernel: MaskedKernel = _sdpa_masked,
) -> torch.Tensor:
    """Self-attention over many short sequences, `group` of them side by side in one sequence of `group` x S
    tokens under a block-diagonal mask: each query still attends to exactly the keys of its own sequence (the
    masked scores are -inf, so their softmax weights are exactly 0: same maths), while the kernels' query tiles
    (64-128 rows) are filled instead of holding 16 rows of one sequence each.

    (B, H, S, D) views of (B, S, H, D) projections (as the processors make them) pack without a copy; a `group`
    that does not divide B, or a cross-attention, falls back to the plain call. `kernel` takes the packed
    tensors and the boolean (group x S)^2 mask (True: attend)."""
    batch, heads, length, width = query.shape
    if group <= 1 or batch % group or key.shape[-2] != length:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(1, 2).reshape(batch // group, group * length, heads, width).transpose(1, 2)

    sequence = torch.arange(group * length, device=query.device) // length
    mask = sequence[:, None] == sequence[None, :]
    out = kernel(pack(query), pack(key), pack(value), scale, mask)
    return out.transpose(1, 2).reshape(batch, length, heads, width).transpose(1, 2)


def _efficient_masked(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, mask: torch.Tensor
) -> torch.Tensor:
    return in_batches(functools.partial(_efficient_attention, mask=mask), query, key, value, scale, KERNEL_BATCH_LIMIT)


def _efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    bias = None
    if mask is not None:  # the kernel takes an additive bias (0: attend, -inf: not), broadcast over batch and heads
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(query.shape[0], query.shape[1], *mask.shape)
    out: torch.Tensor = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, False, scale=scale
    )[0]
    return out


def in_batches(
    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    limit: int,
) -> torch.Tensor:
    """`kernel` over slices of at most `limit` batch entries, concatenated (attention is independent per entry)."""
    if query.shape[0] <= limit:
        return kernel(query, key, value, scale)
    parts = [
        kernel(query[start : start + limit], key[start : start + limit], value[start : start + limit], scale)
        for start in range(0, query.shape[0], limit)
    ]
    return torch.cat(parts)


class AttentionProcessor:
    """diffusers' `AttnProcessor2_0` for the features the I2VGen-XL UNet uses, with `attention` inside.

    `fuse_projections`: the query, key and value projections of a self-attention (key and value of a
    cross-attention) as one GEMM over weights concatenated at each call, so that the input is read once instead of
    three times. Each output column is the same dot product; only cuBLAS's choice of kernel (and its rounding) can
    differ. The weights stay the layer's own (no second copy to keep in step with offloading or loading)."""

    def __init__(self, fuse_projections: bool = False) -> None:
        self.fuse_projections = fuse_projections

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not supported(attn) or attention_mask is not None:
            raise NotImplementedError("AttentionProcessor: masks, spatial norm and q/k norms are not supported")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        fuse = self.fuse_projections and fusable(attn)
        if encoder_hidden_states is None and fuse:
            query, key, value = _linear_of(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if fuse:
                key, value = _linear_of(encoder_hidden_states, attn.to_k, attn.to_v)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        result: torch.Tensor = hidden_states / attn.rescale_output_factor
        return result


def fusable(attn: Any) -> bool:
    """Whether the layer's projections are plain bias-free `Linear`s of one input width (every attention layer of
    the I2VGen-XL UNet; the query's width is checked where it joins the GEMM)."""
    layers = (attn.to_q, attn.to_k, attn.to_v)
    return all(type(layer) is torch.nn.Linear and layer.bias is None for layer in layers) and (
        attn.to_k.in_features == attn.to_v.in_features
    )


def _linear_of(inputs: torch.Tensor, *layers: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
    """`layer(inputs)` for each of `layers` (bias-free, one input width) from one GEMM: views of its output."""
    out = F.linear(inputs, torch.cat([layer.weight for layer in layers]))
    return torch.split(out, [layer.out_features for layer in layers], dim=-1)


class BiasAfterLinear(torch.nn.Linear):
    """A `Linear` whose bias is added after the GEMM instead of in cuBLAS's epilogue, so that a compiler fuses it
    into the pointwise kernel that follows. On an H200 the 320-wide `addmm` of the I2VGen-XL UNet ran at 278
    TFLOP/s, the `mm` of the same shape at 486 (BENCHMARKS.md, the roofline). Same maths: the same dot products,
    then the same addition (in the output's precision rather than cuBLAS's accumulator)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight) + self.bias


def split_linear_bias(model: Any, undo: bool = False) -> int:
    """Make every plain `Linear` with a bias of `model` a `BiasAfterLinear` (`undo`: the other way round); the
    weights and the state dict stay as they are. Returns how many layers changed."""
    before, after = (BiasAfterLinear, torch.nn.Linear) if undo else (torch.nn.Linear, BiasAfterLinear)
    changed = 0
    for module in model.modules():
        if type(module) is before and module.bias is not None:
            module.__class__ = after
            changed += 1
    return changed


def supported(attn: Any) -> bool:
    """Whether `AttentionProcessor` covers this layer's features (every layer of the I2VGen-XL UNet)."""
    return attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None


def install_attention(model: Any, fuse_projections: bool = False) -> int:
    """Give every attention layer of `model` that `AttentionProcessor` covers that processor; returns how many."""
    from diffusers.models.attention_processor import Attention

    changed = 0
    for module in model.modules():
        if isinstance(module, Attention) and supported(module):
            module.set_processor(AttentionProcessor(fuse_projections))  # type: ignore[arg-type]
            changed += 1
    return changed


@dataclass(frozen=True)
class Prepared:
    """The step-invariant inputs of the UNet for one job (batch rows as in `Conditioning`)."""

    context_emb: torch.Tensor
    fps_emb: torch.Tensor
    image_latents: torch.Tensor
    """After `image_latents_proj_in` and the temporal encoder, (B, C, F, H, W)."""


def prepare(
    unet: Any, image_latents: torch.Tensor, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor, fps: Any
) -> Prepared:
    """The parts of `I2VGenXLUNet.forward` that do not depend on the sample or the timestep, same operations."""
    batch_size, channels, num_frames, height, width = image_latents.shape
    fps = fps.expand(fps.shape[0])
    fps_emb = unet.fps_embedding(unet.time_proj(fps).to(dtype=unet.dtype))
    context_emb = prompt_embeds.new_zeros(batch_size, 0, unet.config.cross_attention_dim)
    context_emb = torch.cat([context_emb, prompt_embeds], dim=1)
    first = image_latents[:, :, :1, :]
    first = first.permute(0, 2, 1, 3, 4).reshape(first.shape[0] * first.shape[2], first.shape[1], *first.shape[3:])
    first = unet.image_latents_context_embedding(first)
    _b, _c, _h, _w = first.shape
    context_emb = torch.cat([context_emb, first.permute(0, 2, 3, 1).reshape(_b, _h * _w, _c)], dim=1)
    image_emb = unet.context_embedding(image_embeddings)
    image_emb = image_emb.view(-1, unet.config.in_channels, unet.config.cross_attention_dim)
    context_emb = torch.cat([context_emb, image_emb], dim=1)
    context_emb = context_emb.repeat_interleave(num_frames, dim=0, output_size=context_emb.shape[0] * num_frames)
    latents = image_latents.permute(0, 2, 1, 3, 4).reshape(batch_size * num_frames, channels, height, width)
    latents = unet.image_latents_proj_in(latents)
    latents = (
        latents[None, :]
        .reshape(batch_size, num_frames, channels, height, width)
        .permute(0, 3, 4, 1, 2)
        .reshape(batch_size * height * width, num_frames, channels)
    )
    latents = unet.image_latents_temporal_encoder(latents)
    latents = latents.reshape(batch_size, height, width, num_frames, channels).permute(0, 4, 3, 1, 2)
    return Prepared(context_emb=context_emb, fps_emb=fps_emb, image_latents=latents)


def _embedding(unet: Any, timestep: torch.Tensor, fps_emb: torch.Tensor, rows: int, frames: int) -> torch.Tensor:
    timesteps = timestep[None] if timestep.ndim == 0 else timestep
    t_emb = unet.time_proj(timesteps.expand(rows)).to(dtype=unet.dtype)
    emb = unet.time_embedding(t_emb, None) + fps_emb
    result: torch.Tensor = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
    return result


def _head(unet: Any, sample: torch.Tensor, image_latents: torch.Tensor, frames: int) -> torch.Tensor:
    sample = torch.cat([sample, image_latents], dim=1)
    sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * frames, -1, *sample.shape[3:]))
    sample = unet.conv_in(sample)
    result: torch.Tensor = unet.transformer_in(sample, num_frames=frames, return_dict=False)[0]
    return result


def _down(block: Any, sample: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, frames: int) -> Any:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=ctx, num_frames=frames)
    return block(hidden_states=sample, temb=emb, num_frames=frames)


def _both_halves(hidden: torch.Tensor) -> torch.Tensor:
    """The rows computed once, as the unconditional and the conditional half of the guided batch."""
    return torch.cat([hidden, hidden])


def _first_down_shared(
    block: Any, hidden: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, frames: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The first down block on the rows of one guidance half (`emb` of both): for a `CrossAttnDownBlock3D`
    (its `forward`, diffusers 0.42.1) the first resnet and temporal convolution, which read no context, run once
    and the rest on both halves; a block without context runs on both halves."""
    if not getattr(block, "has_cross_attention", False):
        hidden, res = _down(block, _both_halves(hidden), emb, ctx, frames)
        return hidden, res
    emb_once = emb[: emb.shape[0] // 2]
    output_states: tuple[torch.Tensor, ...] = ()
    layers = zip(block.resnets, block.temp_convs, block.attentions, block.temp_attentions, strict=True)
    for index, (resnet, temp_conv, attn, temp_attn) in enumerate(layers):
        hidden = resnet(hidden, emb_once if index == 0 else emb)
        hidden = temp_conv(hidden, num_frames=frames)
        if index == 0:
            hidden = _both_halves(hidden)
        hidden = attn(hidden, encoder_hidden_states=ctx, cross_attention_kwargs=None, return_dict=False)[0]
        hidden = temp_attn(hidden, num_frames=frames, cross_attention_kwargs=None, return_dict=False)[0]
        output_states += (hidden,)
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            hidden = downsampler(hidden)
        output_states += (hidden,)
    return hidden, output_states


def _up(
    block: Any, sample: torch.Tensor, res: Any, emb: torch.Tensor, ctx: torch.Tensor, frames: int, size: Any
) -> Any:
    kwargs: dict[str, Any] = {"temb": emb, "res_hidden_states_tuple": res, "upsample_size": size, "num_frames": frames}
    if getattr(block, "has_cross_attention", False):
        kwargs["encoder_hidden_states"] = ctx
    return block(hidden_states=sample, **kwargs)


def _tail(unet: Any, sample: torch.Tensor, frames: int) -> torch.Tensor:
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    result: torch.Tensor = sample[None, :].reshape((-1, frames, *sample.shape[1:])).permute(0, 2, 1, 3, 4)
    return result


def step(
    unet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    prep: Prepared,
    deep: torch.Tensor | None = None,
    guided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-dependent rest of `I2VGenXLUNet.forward`: (noise prediction, deep feature).

    The deep feature is the input of the last (highest-resolution) up block. With `deep` given, the pass is
    shallow (DeepCache): only the head, the first down block and the last up block run, the rest is `deep`.
    `guided`: `sample` is the latents once, for a `prep` of both guidance halves (unconditional rows first, as
    `torch.cat([latents] * 2)` would give them, whose halves of `image_latents` and `fps_emb` are the same): the
    result is that of `step(cat([sample] * 2), ...)`, with the part before the first context computed once.
    """
    frames = sample.shape[2]
    rows = sample.shape[0] * (2 if guided else 1)
    emb = _embedding(unet, timestep, prep.fps_emb, rows, frames)
    factor = 2**unet.num_upsamplers
    forward_size = any(size % factor != 0 for size in sample.shape[-2:])
    image_latents = prep.image_latents[: sample.shape[0]] if guided else prep.image_latents
    hidden = _head(unet, sample, image_latents, frames)
    skips: tuple[torch.Tensor, ...] = (_both_halves(hidden) if guided else hidden,)
    blocks = unet.down_blocks if deep is None else unet.down_blocks[:1]
    for number, block in enumerate(blocks):
        if guided and number == 0:
            hidden, res = _first_down_shared(block, hidden, emb, prep.context_emb, frames)
        else:
            hidden, res = _down(block, hidden, emb, prep.context_emb, frames)
        skips += res
    if deep is None:
        hidden = unet.mid_block(hidden, emb, encoder_hidden_states=prep.context_emb, num_frames=frames)
        for block in unet.up_blocks[:-1]:
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if forward_size else None
            hidden = _up(block, hidden, res, emb, prep.context_emb, frames, size)
        deep = hidden
    else:
        skips = skips[: len(unet.up_blocks[-1].resnets)]
    last = unet.up_blocks[-1]
    out = _up(last, deep, skips[-len(last.resnets) :], emb, prep.context_emb, frames, None)
    return _tail(unet, out, frames), deep


def eager_layout(model: Any) -> None:
    """Undo what pays only when compiled (`split_linear_bias`, `to_channels_last`: an eager step was slower with
    each): what the generator does when its compile falls back to eager."""
    split_linear_bias(model, undo=True)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            module.weight.data = module.weight.data.contiguous()


def to_channels_last(model: Any) -> int:
    """Convolution weights in channels-last layout (cuDNN's native one: no NCHW<->NHWC transposes around each
    convolution); 5-D (temporal) convolutions get the 3-D variant. Returns how many weights changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            layout = torch.channels_last if module.weight.ndim == 4 else torch.channels_last_3d
            module.weight.data = module.weight.data.to(memory_format=layout)
            changed += 1
    return changed
