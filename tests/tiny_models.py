"""Tiny random-weight mlx-lm models of every supported architecture (no downloads)."""

from __future__ import annotations

import importlib

import mlx.core as mx

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=6,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=211,
)

# model_type -> (mlx-lm module, extra ModelArgs fields)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "mistral": ("llama", dict(tie_word_embeddings=False)),
    "smollm3": ("smollm3", dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts_per_tok=2,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
    ),
    "qwen3": (
        "qwen3",
        dict(max_position_embeddings=512, head_dim=16, tie_word_embeddings=True, rope_theta=1e4),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=32,
            head_dim=16,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            max_position_embeddings=512,
            norm_topk_prob=True,
        ),
    ),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("phi3", dict()),
    "olmo2": ("olmo2", dict()),
    "starcoder2": ("starcoder2", dict(norm_epsilon=1e-5)),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": ("gemma2", dict(head_dim=16, final_logit_softcapping=30.0)),
    "gemma3_text": (
        "gemma3_text",
        dict(head_dim=16, sliding_window=4, sliding_window_pattern=3, query_pre_attn_scalar=16),
    ),
    "cohere": ("cohere", dict(logit_scale=0.25, layer_norm_eps=1e-5)),
    "granite": (
        "granite",
        dict(
            logits_scaling=4.0,
            attention_multiplier=0.25,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            max_position_embeddings=512,
            attention_bias=False,
            mlp_bias=False,
            rope_theta=10000.0,
        ),
    ),
}


def tiny_model(arch: str, *, seed: int = 0, num_layers: int | None = None):
    module_name, extra = ARCHS[arch]
    module = importlib.import_module(f"mlx_lm.models.{module_name}")
    model_type = arch.split("-")[0]
    fields = {f for f in module.ModelArgs.__dataclass_fields__}
    args = {k: v for k, v in COMMON.items() if k in fields}
    args.update(extra)
    if num_layers is not None:
        args["num_hidden_layers"] = num_layers
    model_args = module.ModelArgs(model_type=model_type, **args)
    mx.random.seed(seed)
    model = module.Model(model_args)
    if hasattr(model, "sanitize") and arch == "gemma3_text":
        # Tied head, as the released Gemma 3 checkpoints are.
        model.sanitize({})
    # Larger weights than the default init make the layers disagree, so that strategies
    # have something to choose between.
    params = model.parameters()
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p * 2.0 if p.ndim == 2 else p, params))
    mx.eval(model.parameters())
    return model
