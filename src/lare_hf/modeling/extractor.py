"""The Extractor (Sec. 3.1, Eq. 3-5, Appendix B "Architecture of Extractor").

N layers; in each: a linear transformation, multi-head self-attention over the current queries and the earlier
latent tokens (internal reasoning dynamics, Eq. 3), multi-head cross-attention over the window's visual features
V_s (refocusing, Eq. 4), both pre-norm with residual connections; then a gated linear unit and a feed-forward
network (Eq. 5). Queries: `m` learned slot embeddings plus a linear map of the LLM's last-position hidden state H^(k).
The output is RMS-normalised to the scale of the language model's token embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_lare import LaReConfig


class LaReExtractorLayer(nn.Module):
    """One Extractor layer: linear transform -> self-attention (Eq. 3) -> cross-attention over V_s (Eq. 4)."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.self_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.context_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)

    def forward(
        self,
        queries: torch.Tensor,
        history: torch.Tensor | None,
        window_features: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.transform(queries)
        normed = self.self_attn_norm(hidden)
        context = normed if history is None else torch.cat([self.self_attn_norm(history), normed], dim=1)
        hidden = hidden + self.self_attn(normed, context, context, need_weights=False)[0]
        visual = self.context_norm(window_features)
        attended, weights = self.cross_attn(self.cross_attn_norm(hidden), visual, visual, need_weights=need_weights)
        return hidden + attended, weights


class LaReExtractor(nn.Module):
    """Turns (H^(k), earlier latents Z^(<k), window features V_s) into `m` latent tokens Z^(k) (Eq. 3-5)."""

    def __init__(self, config: LaReConfig):
        super().__init__()
        text_hidden = config.text_config.hidden_size
        hidden = config.extractor_hidden_size or text_hidden
        intermediate = config.extractor_intermediate_size or 4 * hidden
        self.num_slots = config.latent_tokens_per_step
        self.slot_embeddings = nn.Parameter(torch.zeros(self.num_slots, hidden))
        self.state_proj = nn.Linear(text_hidden, hidden)
        self.input_proj = nn.Identity() if hidden == text_hidden else nn.Linear(text_hidden, hidden)
        self.layers = nn.ModuleList(
            [LaReExtractorLayer(hidden, config.extractor_num_heads) for _ in range(config.extractor_num_layers)]
        )
        self.glu_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.glu = nn.Linear(hidden, 2 * hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))
        self.output_proj = nn.Identity() if hidden == text_hidden else nn.Linear(hidden, text_hidden)
        self.output_norm = nn.RMSNorm(text_hidden, eps=1e-6)

    def forward(
        self,
        last_hidden_state: torch.Tensor,
        window_features: torch.Tensor,
        history: torch.Tensor | None,
        embedding_scale: torch.Tensor,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            last_hidden_state: `[batch, text_hidden]` H^(k), the LLM's hidden state at the last fed position.
            window_features: `[batch, window_tokens, text_hidden]` V_s, the visual tokens under the window.
            history: `[batch, (k-1)*m, text_hidden]` the latent tokens of earlier steps, or None at k=1.
            embedding_scale: RMS of the LM's token embeddings; the output is normalised to it.

        Returns:
            Z^(k) `[batch, m, text_hidden]` and, if asked, the last layer's cross-attention over V_s
            `[batch, m, window_tokens]` (averaged over heads) for visualisation.
        """
        queries = self.slot_embeddings.unsqueeze(0) + self.state_proj(last_hidden_state).unsqueeze(1)
        visual = self.input_proj(window_features)
        past = None if history is None else self.input_proj(history)
        attention = None
        for layer in self.layers:
            queries, attention = layer(queries, past, visual, need_weights=return_attention)
        value, gate = self.glu(self.glu_norm(queries)).chunk(2, dim=-1)
        hidden = queries + value * torch.sigmoid(gate)
        hidden = hidden + self.ffn(self.ffn_norm(hidden))
        latents = self.output_norm(self.output_proj(hidden)) * embedding_scale
        return latents, attention


__all__ = ["LaReExtractor", "LaReExtractorLayer"]
