"""LLaMA 1/2/3 and Mistral: pre-norm decoder, rotary embeddings, gated MLP."""

from .base import ArchAdapter, LinearGroup

GATED_DECODER_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", "linear"),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "linear"),
)

LLAMA = ArchAdapter(
    family="llama",
    model_types=("llama", "mistral"),
    layers="model.layers",
    pre_modules=("model.embed_tokens", "model.rotary_emb"),
    final_norm="model.norm",
    post_modules=("model.norm",),
    lm_head="lm_head",
    groups=GATED_DECODER_GROUPS,
)
