"""OPT: learned positions, LayerNorm with bias, fc1/fc2 MLP, optional project_in/out."""

from .base import ArchAdapter, LinearGroup

OPT = ArchAdapter(
    family="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    pre_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    final_norm="model.decoder.final_layer_norm",
    post_modules=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    lm_head="lm_head",
    groups=(
        LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm", "norm"),
        LinearGroup("attn_out", ("self_attn.out_proj",), "self_attn.v_proj", "linear"),
        LinearGroup("mlp_in", ("fc1",), "final_layer_norm", "norm"),
        LinearGroup("mlp_out", ("fc2",), "fc1", "linear"),
    ),
)
