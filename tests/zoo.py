"""A zoo of tiny, randomly initialised causal LMs of many transformers architectures, built from configs
offline: what the side-path tests run LOZO on, and the source of the README's "Supported models" table
(`python tests/zoo.py` prints it).

Each entry: the config's model_type, the config values that make it tiny, and what the architecture brings
to the side path's reads (its layout)."""

import sys

import torch

LLAMA_LIKE = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)
GPT2_LIKE = dict(n_embd=16, n_layer=2, n_head=2, n_positions=128)
MOE = dict(LLAMA_LIKE, num_experts_per_tok=2)

ZOO = {
    "opt": (dict(hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=32,
                 num_attention_heads=2, max_position_embeddings=128),
            "Linear with bias, learned positions (an Embedding subclass with its own forward), tied head"),
    "llama": (dict(LLAMA_LIKE, tie_word_embeddings=False), "GQA, rotary, untied head"),
    "gpt2": (GPT2_LIKE, "Conv1D (x·W + b), fused QKV, learned positions, tied head"),
    "openai-gpt": (GPT2_LIKE, "Conv1D, learned positions, tied head"),
    "gpt_bigcode": (dict(GPT2_LIKE, multi_query=True), "multi-query attention, fused QKV Linear"),
    "gpt_neo": (dict(hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=128,
                     attention_types=[[["global", "local"], 1]], window_size=8), "local attention"),
    "gpt_neox": (dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=128), "fused QKV, parallel attention, partial rotary"),
    "gptj": (dict(n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=128),
             "parallel attention, LM head with bias"),
    "codegen": (dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, n_ctx=128),
                "fused QKV, parallel attention"),
    "falcon": (dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, multi_query=True,
                    parallel_attn=True, bias=False), "FalconLinear (input @ weight.T), multi-query"),
    "bloom": (dict(hidden_size=16, n_layer=2, n_head=2), "fused QKV, ALiBi, embedding layer norm"),
    "mpt": (dict(d_model=16, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=128), "ALiBi, no bias"),
    "mistral": (dict(LLAMA_LIKE, sliding_window=8), "GQA, sliding window"),
    "qwen2": (LLAMA_LIKE, "QKV with bias"),
    "qwen3": (dict(LLAMA_LIKE, head_dim=8), "QK norm"),
    "gemma": (dict(LLAMA_LIKE, head_dim=8), "scaled embeddings, tied head"),
    "gemma2": (dict(LLAMA_LIKE, head_dim=8, sliding_window=8), "soft-capped logits, sandwich norms"),
    "phi": (dict(LLAMA_LIKE, partial_rotary_factor=0.5), "parallel attention, partial rotary, biases"),
    "phi3": (LLAMA_LIKE, "fused QKV and gate-up projections"),
    "stablelm": (LLAMA_LIKE, "partial rotary, LayerNorm"),
    "starcoder2": (LLAMA_LIKE, "biases, LayerNorm"),
    "olmo2": (LLAMA_LIKE, "QK norm, post-norms"),
    "cohere": (LLAMA_LIKE, "parallel attention, logit scale, tied head"),
    "granite": (LLAMA_LIKE, "embedding and residual multipliers"),
    "biogpt": (dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=128), "learned positions, scaled embeddings"),
    "xglm": (dict(d_model=16, num_layers=2, attention_heads=2, ffn_dim=32, max_position_embeddings=128),
             "sinusoidal positions"),
    "mixtral": (dict(MOE, num_local_experts=4), "mixture of experts, experts stored as (E, m, n)"),
    "qwen2_moe": (dict(MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16),
                  "mixture of experts and a shared expert"),
    "olmoe": (dict(MOE, num_experts=4), "mixture of experts, QK norm"),
}  # fmt: skip


def tiny_model(model_type, vocab_size, seed=0, dtype=torch.float32):
    """A tiny randomly initialised model of `model_type` (a key of ZOO), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **ZOO[model_type][0])
    config.vocab_size = vocab_size
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, name, None) is not None and getattr(config, name) >= vocab_size:
            setattr(config, name, 0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def perturbed_steps(optimizer, model, inputs, grads):
    """Zeroth-order steps as the trainer takes them: a forward at θ+εZ and at θ−εZ, then the update with g."""
    for g in grads:
        optimizer.begin_step()
        for position in (+1, -1):
            optimizer.move_to(position)
            model(**inputs)
        optimizer.set_projected_grad(g)
        optimizer.step()


def supported_models_table():
    """The README's table: each architecture, the class the zoo builds, and what it exercises."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rows = ["| model_type | class | what it brings to the side path |", "|---|---|---|"]
    for model_type, (overrides, layout) in ZOO.items():
        config = AutoConfig.for_model(model_type, **overrides)
        name = AutoModelForCausalLM._model_mapping[type(config)].__name__
        rows.append(f"| `{model_type}` | `{name}` | {layout} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(supported_models_table() + "\n")
