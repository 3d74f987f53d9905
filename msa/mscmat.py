"""MSCMAT: the Multi-scale Cross-Modal Alignment Transformer, one image-to-words cross-attention per scale.

For scale s, image i and text j the published layer computes

    q_raw_i  = fc_s(pooled scale feature of image i)                                  [D]
    attn_ij  = MultiheadAttention(query = LN_img(q_raw_i), keys = values = LN_word(words of text j))
    score_ij = sigmoid(match_fc_s((attn_ij + t_j) * q_raw_i))                         t_j: text global feature

and the published code gets every score of a batch by building all B^2 (image, text) pairs and running the
attention on each pair, projecting every text's keys and values B times. The whole score reduces exactly to
one fused pairwise core plus cheap terms. With Q = LN_img(q_raw) W_q^T + b_q, K/V = LN_word(words) W_{k,v}^T +
b_{k,v} (projected once per image and once per text), attn_ij = W_o concat_h(sum_l p_ijhl V_jlh) + b_o and the
score head's weight w_s and bias b_s, put

    g_i = w_s * q_raw_i             (elementwise)
    u_i = W_o^T g_i                 (split into heads like Q)

so that  w_s . ((attn_ij + t_j) * q_raw_i) = g_i . attn_ij + g_i . t_j  and  g_i . (W_o c) = (W_o^T g_i) . c:

    logit_ij = sum_h sum_l p_ijhl <u_ih, V_jlh>  +  g_i . b_o  +  g_i . t_j  +  b_s
             = mscmat_scores(Q, u, K, V)[i, j]   +  per-image bias  +  (g t^T)[i, j]  +  b_s.

The core is ``msa.ops.mscmat_scores``, which never materialises the pairs; the rest is an outer product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msa.ops import mscmat_scores
from msa.ops.mscmat import BACKENDS


class ScaleAlignment(nn.Module):
    """The parameters of one MSCMAT scale, exactly as published: ``fc`` (C_s -> D), the cross-attention
    ``attn`` (``nn.MultiheadAttention``: in_proj_weight [3D, D], in_proj_bias, out_proj) and ``match_fc`` (D -> 1)."""

    def __init__(self, in_channels: int, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.fc = nn.Linear(in_channels, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.match_fc = nn.Linear(dim, 1)

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def project_words(self, normed_words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Nt, L, H, Dh] of already layer-normalised word tokens [Nt, L, D]."""
        dim = self.attn.embed_dim
        nt, length, _ = normed_words.shape
        weight_k, weight_v = self.attn.in_proj_weight[dim:].chunk(2)
        bias_k, bias_v = self.attn.in_proj_bias[dim:].chunk(2)
        shape = (nt, length, self.num_heads, dim // self.num_heads)
        keys = F.linear(normed_words, weight_k, bias_k).view(shape)
        return keys, F.linear(normed_words, weight_v, bias_v).view(shape)

    def logits(
        self,
        image_feature: torch.Tensor,
        image_query_norm: nn.LayerNorm,
        keys: torch.Tensor,
        values: torch.Tensor,
        text_global: torch.Tensor,
        word_mask: torch.Tensor | None,
        backend: str,
    ) -> torch.Tensor:
        """Pre-sigmoid scores [Ni, Nt] (see the module docstring for the algebra)."""
        dim = self.attn.embed_dim
        heads = self.num_heads
        ni = image_feature.shape[0]
        q_raw = self.fc(image_feature)
        queries = F.linear(image_query_norm(q_raw), self.attn.in_proj_weight[:dim], self.attn.in_proj_bias[:dim])
        readout_weights = self.match_fc.weight[0] * q_raw  # g_i
        readouts = readout_weights @ self.attn.out_proj.weight  # u_i = W_o^T g_i
        core = mscmat_scores(
            queries.view(ni, heads, dim // heads),
            readouts.view(ni, heads, dim // heads),
            keys,
            values,
            word_mask,
            backend=backend,
        )
        image_bias = readout_weights @ self.attn.out_proj.bias + self.match_fc.bias
        return core + image_bias[:, None] + readout_weights @ text_global.T


def check_backend_name(name: str) -> str:
    """``name`` if it is an ``mscmat_scores`` backend; checked when a model is built or loaded, not at its first
    forward. Whether the backend can run on the tensors' device is decided by the op itself."""
    if name not in BACKENDS:
        raise ValueError(f"unknown mscmat_scores backend {name!r}; expected one of {BACKENDS}")
    return name


class MSCMAT(nn.Module):
    """All scales of MSCMAT with the two LayerNorms they share.

    Args:
        scale_channels: channels C_s of each image scale, smallest (shallowest) scale first.
        dim: model width D (published: 768).
        num_heads: attention heads H (published: 12).
        backend: ``mscmat_scores`` backend ("auto" picks the fastest available); a run-time choice that may be
            changed at any time (``layer.backend = "reference"``), never saved with the weights.

    Published parameter names: ``image_query_norm`` = ``ln_pre_t``, ``word_norm`` = ``ln_pre_i``,
    ``scales[s].fc`` = ``fc{s+1}``, ``scales[s].attn`` = ``cross_attn{s+1}``,
    ``scales[s].match_fc`` = ``match_fc{s+1}``.
    """

    def __init__(self, scale_channels: Sequence[int], dim: int = 768, num_heads: int = 12, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.backend = backend  # checked by the property below
        self.image_query_norm = nn.LayerNorm(dim)
        self.word_norm = nn.LayerNorm(dim)
        self.scales = nn.ModuleList(ScaleAlignment(channels, dim, num_heads) for channels in scale_channels)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend_name(name)

    def forward(
        self,
        scale_features: Sequence[torch.Tensor],
        word_tokens: torch.Tensor,
        text_global: torch.Tensor,
        word_mask: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> list[torch.Tensor]:
        """Score matrices of every image against every text, one per scale.

        Args:
            scale_features: pooled image features, one [Ni, C_s] per scale, smallest scale first.
            word_tokens: word features [Nt, L, D].
            text_global: global text features [Nt, D].
            word_mask: [Nt, L], nonzero = attend to the word; None attends to every token (as published).
            return_logits: return the pre-sigmoid logits instead of the sigmoid scores.

        Returns:
            one [Ni, Nt] matrix per scale (rows = images, columns = texts), smallest scale first.
            A text whose mask has no valid word gets logit = the bias terms alone (its attention output is 0).
        """
        if len(scale_features) != len(self.scales):
            raise ValueError(f"MSCMAT: expected {len(self.scales)} scale features, got {len(scale_features)}")
        if word_tokens.dim() != 3 or word_tokens.shape[-1] != self.dim:
            raise ValueError(f"MSCMAT: word_tokens must be [Nt, L, {self.dim}], got {tuple(word_tokens.shape)}")
        if text_global.shape != (word_tokens.shape[0], self.dim):
            raise ValueError(
                f"MSCMAT: text_global must be [Nt={word_tokens.shape[0]}, {self.dim}], got {tuple(text_global.shape)}"
            )
        ni = scale_features[0].shape[0]
        for index, (feature, scale) in enumerate(zip(scale_features, self.scales)):
            if feature.shape != (ni, scale.fc.in_features):
                raise ValueError(
                    f"MSCMAT: scale_features[{index}] must be [Ni={ni}, {scale.fc.in_features}], "
                    f"got {tuple(feature.shape)}"
                )
        normed_words = self.word_norm(word_tokens)
        outputs = []
        for feature, scale in zip(scale_features, self.scales):
            keys, values = scale.project_words(normed_words)
            logits = scale.logits(feature, self.image_query_norm, keys, values, text_global, word_mask, self.backend)
            outputs.append(logits if return_logits else torch.sigmoid(logits))
        return outputs


def mscmat_pairs_ref(
    module: MSCMAT,
    scale_features: Sequence[torch.Tensor],
    word_tokens: torch.Tensor,
    text_global: torch.Tensor,
    word_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The published computation: materialise all Ni x Nt (image, text) pairs and run ``nn.MultiheadAttention``
    on each. The reference the fused layer is tested and benchmarked against; memory grows as Ni * Nt * L * D."""
    ni, nt = scale_features[0].shape[0], word_tokens.shape[0]
    normed_words = module.word_norm(word_tokens)
    pair_words = normed_words.repeat(ni, 1, 1)  # pair p = i * Nt + j holds text j
    padding = None if word_mask is None else (word_mask == 0).repeat(ni, 1)
    pair_text_global = text_global.repeat(ni, 1)
    outputs = []
    for feature, scale in zip(scale_features, module.scales):
        q_raw = scale.fc(feature).repeat_interleave(nt, dim=0)  # pair p holds image i = p // Nt
        query = module.image_query_norm(q_raw)[:, None, :]
        attended, _ = scale.attn(query, pair_words, pair_words, key_padding_mask=padding, need_weights=False)
        logits = scale.match_fc((attended[:, 0] + pair_text_global) * q_raw)
        outputs.append(torch.sigmoid(logits).view(ni, nt))
    return outputs
