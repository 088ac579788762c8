"""LTX-2 cross-attention with its value projection after the attention weights, for calibration.

A calibration call has few video or audio queries (12-18 tokens) against 1,024 text keys. Per
head, ``softmax(Q K^T) (X Wv^T + b) = (P X) Wv^T + b`` (each row of ``P`` sums to one), so the
value projection costs heads x queries x (keys + head width) x inputs products instead of keys
x inputs x outputs: at LTX-2.3's widths about 7x fewer. Its weight gradient is the heads'
output gradient times ``P X``, so its energy needs no Gram matrix of the text either. Keys are
still projected in full (their RMS norm across heads needs every key), but the norm scales the
scores instead of the keys. Installed only while block_calibration.output_gains measures
(:func:`values_after_attention`); every other call (a self-attention, rotary embeddings,
perturbation, many queries) goes to the module's own processor.
"""

from __future__ import annotations

import contextlib

import torch


def few_queries(queries: int, keys: int, head_width: int) -> bool:
    """Whether the value projection is cheaper after the attention weights: heads x queries x
    (keys + head width) products per input channel, against keys x heads x head width."""
    return queries * (keys + head_width) < keys * head_width


class ValuesAfterAttention:
    """A stand-in processor for one attention module; ``record(to_v, x, mixed, heads)`` is
    told of each reassociated value projection (input ``x``, ``P X`` and the heads' outputs,
    sequences x heads x queries x ...) and returns the heads' outputs to go on with."""

    def __init__(self, standing, record):
        self.standing, self.record = standing, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 query_rotary_emb=None, key_rotary_emb=None, perturbation_mask=None,
                 all_perturbed=None):
        if encoder_hidden_states is None or query_rotary_emb is not None \
                or key_rotary_emb is not None or perturbation_mask is not None or all_perturbed \
                or not _plain(attn) or not few_queries(hidden_states.shape[1],
                                                       encoder_hidden_states.shape[1],
                                                       attn.head_dim):
            perturbation = {key: value for key, value in (("perturbation_mask", perturbation_mask),
                                                          ("all_perturbed", all_perturbed))
                            if value is not None}
            return self.standing(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 query_rotary_emb, key_rotary_emb, **perturbation)
        return self._reassociated(attn, hidden_states, encoder_hidden_states, attention_mask)

    def _reassociated(self, attn, hidden_states, text, attention_mask):
        batch, keys, heads = hidden_states.shape[0], text.shape[1], attn.heads
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None \
            else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.to_k(text)
        # The keys' RMS norm across heads scales the scores, not the keys: the normalised keys
        # (keys x inner) are never formed, forward or backward.
        if attn.norm_k.weight is not None:
            query = query * attn.norm_k.weight
        eps = attn.norm_k.eps if attn.norm_k.eps is not None else torch.finfo(key.dtype).eps
        inverse_rms = torch.rsqrt(torch.linalg.vector_norm(key, dim=-1, dtype=torch.float32)
                                  .square() / key.shape[-1] + eps)
        query = query.unflatten(2, (heads, -1)).transpose(1, 2)
        key = key.unflatten(2, (heads, -1)).transpose(1, 2)
        scale = (inverse_rms * attn.head_dim ** -0.5).to(query.dtype)[:, None, None, :]
        scores = (query @ key.mT) * scale                         # SDPA's scale, by key
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            mask = mask.view(batch, heads, -1, keys)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        weights = scores.float().softmax(-1).to(text.dtype)
        # P X as one product per sequence (a broadcast over heads would copy the text per head)
        mixed = (weights.flatten(1, 2) @ text).unflatten(1, (heads, -1))   # batch, heads, q, in
        out = mixed @ attn.to_v.weight.view(heads, attn.head_dim, -1).mT
        if attn.to_v.bias is not None:
            out = out + attn.to_v.bias.view(heads, 1, attn.head_dim)
        out = self.record(attn.to_v, text, mixed, out).transpose(1, 2)   # batch, queries, heads
        if gate_logits is not None:
            out = out * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _plain(attn) -> bool:
    """Whether ``attn``'s value projection and key norm are the plain torch modules whose
    weights this reads (not a wrapped, packed or LoRA layer), one value head per query head."""
    return type(attn.to_v) is torch.nn.Linear and type(attn.norm_k) is torch.nn.RMSNorm \
        and attn.to_v.out_features == attn.heads * attn.head_dim


@contextlib.contextmanager
def values_after_attention(model: torch.nn.Module, record):
    """Every LTX-2 attention module of ``model`` runs through :class:`ValuesAfterAttention`
    (reporting to ``record``) inside the ``with``; its own processor is back afterwards."""
    from diffusers.models.transformers.transformer_ltx2 import LTX2Attention

    modules = [m for m in model.modules() if isinstance(m, LTX2Attention)]
    standing = [m.processor for m in modules]
    try:
        for module, processor in zip(modules, standing):
            module.processor = ValuesAfterAttention(processor, record)
        yield
    finally:
        for module, processor in zip(modules, standing):
            module.processor = processor
