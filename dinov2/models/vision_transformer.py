"""DINOv2 vision transformer, state-dict compatible with the official DINOv2 and DinoBloom weights.

Tokens: ``[cls, registers..., patches...]``. Position embeddings cover ``cls`` and the patches of an
``img_size`` grid and are resampled to other input sizes exactly as DINOv2 does
(:func:`interpolate_pos_embed`); registers get none. ``forward_features`` returns DINOv2's dict
(``x_norm_clstoken``, ``x_norm_regtokens``, ``x_norm_patchtokens``, ``x_prenorm``, ``masks``) and
takes one tensor or a list of crops of different sizes (one dict per crop).
"""

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.errors import ConfigError
from dinov2.layers import Block, LayerScale, Mlp, PatchEmbed, SwiGLUFFNFused
from dinov2.layers.token_selection import TokenSelection

FFN_LAYERS = {"mlp": Mlp, "swiglufused": SwiGLUFFNFused, "swiglu": SwiGLUFFNFused}

# Size presets; every other constructor argument can be overridden (see dinov2.models.build_backbone).
ARCHS = {
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
    "vit_custom": dict(),
}


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """Resample ``pos_embed`` ``(1, 1 + M*M, D)`` to a ``grid = (h, w)`` of patches -> ``(1, 1 + h*w, D)``.

    DINOv2's recipe: the ``cls`` entry is kept, the ``M x M`` patch grid is resized bicubically in
    fp32 with scale factors ``((h + offset) / M, (w + offset) / M)`` (the historical 0.1 offset;
    ``offset=0`` asks for the output size ``(h, w)`` instead, as DINOv2's register models do).
    """
    num_patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    height, width = grid
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resize = dict(scale_factor=((height + offset) / side, (width + offset) / side))
    else:
        resize = dict(size=(height, width))
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **resize)
    if tuple(patch_pos.shape[-2:]) != (height, width):
        raise ValueError(f"interpolated pos_embed grid {tuple(patch_pos.shape[-2:])} != {(height, width)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, height * width, dim)
    return torch.cat((pos_embed[:, :1].float(), patch_pos), dim=1).to(pos_embed.dtype)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT. ``init_values`` is the LayerScale init (``None``/0: no LayerScale, no ``ls*.gamma``);
    ``drop_path_uniform`` gives every block ``drop_path_rate`` instead of a linear ramp ``0 -> rate``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = 1e-5,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        arch: str = "vit_custom",
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ConfigError(f"unknown ffn_layer {ffn_layer!r}; choose one of {sorted(FFN_LAYERS)}")
        self.arch = arch
        self.config = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            ffn_bias=ffn_bias,
            proj_bias=proj_bias,
            drop_path_rate=drop_path_rate,
            drop_path_uniform=drop_path_uniform,
            init_values=init_values,
            ffn_layer=ffn_layer,
            num_register_tokens=num_register_tokens,
            interpolate_antialias=interpolate_antialias,
            interpolate_offset=interpolate_offset,
        )
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.n_blocks = depth
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rate,
                init_values=init_values,
                act_layer=nn.GELU,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                ffn_layer=FFN_LAYERS[ffn_layer],
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's init: pos_embed ~ TruncNormal(0.02), cls/register tokens ~ N(0, 1e-6), Linear weights
        ~ TruncNormal(0.02) with zero bias, LayerScale at ``init_values``, mask_token 0; others PyTorch's."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.Conv2d, LayerScale)):
                module.reset_parameters()

    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for tokens ``x`` ``(B, 1 + N, D)`` of a ``height x width`` image; as DINOv2,
        the stored table is used as is only when the image is square with as many patches."""
        num_patches = x.shape[1] - 1
        if num_patches == self.pos_embed.shape[1] - 1 and height == width:
            return self.pos_embed
        grid = (height // self.patch_size, width // self.patch_size)
        return interpolate_pos_embed(self.pos_embed, grid, self.interpolate_offset, self.interpolate_antialias).to(
            x.dtype
        )

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + R + N, D)``; patches where ``masks`` ``(B, N)`` is
        True are replaced by ``mask_token`` before the position embeddings are added."""
        height, width = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _output(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None = None
    ) -> list[dict[str, torch.Tensor | None]]:
        """One pass over crops of different sizes; the same as calling :meth:`forward_features` per crop."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"{len(x_list)} crop tensors but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, masks) for x, masks in zip(x_list, masks_list)]
        for block in self.blocks:
            tokens = block(tokens)
        return [self._output(x, masks) for x, masks in zip(tokens, masks_list)]

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._output(tokens, masks)

    def forward_features_selected(
        self,
        x_list: Sequence[torch.Tensor],
        masks_list: Sequence[torch.Tensor | None],
        patches_list: Sequence[torch.Tensor | None],
    ) -> list[dict[str, torch.Tensor]]:
        """Training forward for losses that read the CLS token and a few patch tokens per crop.

        ``patches_list[i]``: bool ``[B_i, n_patches]``, the patch tokens wanted (None: CLS only).
        Per crop ``{"x_norm_clstoken": (B, D), "x_norm_patchtokens": (n_wanted, D)}``, the patch
        tokens in the order of ``patches[patches]``: equal to :meth:`forward_features_list`'s
        outputs indexed so, for the same RNG state, but the last block computes its queries,
        projection and MLP for those tokens only (ViT-S/14 global crops with DINOv2's masks: that
        block's forward + backward 2.5x faster).
        """
        if not (len(x_list) == len(masks_list) == len(patches_list)):
            raise ValueError(
                f"{len(x_list)} crop tensors, {len(masks_list)} masks, {len(patches_list)} patch selections"
            )
        tokens = [self.prepare_tokens_with_masks(x, masks) for x, masks in zip(x_list, masks_list)]
        first_patch = 1 + self.num_register_tokens
        selections = [
            TokenSelection.first_and_patches(patches, t.shape[0], t.shape[1], first_patch, device=t.device)
            for t, patches in zip(tokens, patches_list)
        ]
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        if len(self.blocks):
            rows = self.blocks[-1](tokens, selection=selections)
        else:
            rows = [selection.gather(t) for t, selection in zip(tokens, selections)]
        outputs = []
        for selected, selection in zip(rows, selections):
            selected = self.norm(selected)
            first = selection.is_first()
            outputs.append({"x_norm_clstoken": selected[first], "x_norm_patchtokens": selected[~first]})
        return outputs

    def forward_clstoken(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features(x)["x_norm_clstoken"]`` ``(B, D)`` for inference, cheaper: the last block
        computes its query, projection and MLP for the CLS token alone (~5% of a ViT-S/14 forward)."""
        if self.training:
            raise RuntimeError("forward_clstoken is for inference; call model.eval() first (or use forward_features)")
        return self.forward_features_selected([x], [None], [None])[0]["x_norm_clstoken"]

    def forward(self, x, masks=None, is_training: bool = False, patches: Sequence[torch.Tensor | None] | None = None):
        """``is_training=True``: the feature dict(s); otherwise ``head(x_norm_clstoken)`` (head is Identity).
        ``patches`` (one bool selection per crop of the list ``x``): :meth:`forward_features_selected`'s
        dicts; through here (not the method) so that FSDP's hooks gather the parameters."""
        if patches is not None:
            return self.forward_features_selected(x, masks if masks is not None else [None] * len(x), patches)
        if not is_training and not self.training and masks is None and torch.is_tensor(x):
            return self.head(self.forward_clstoken(x))
        features = self.forward_features(x, masks)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])
