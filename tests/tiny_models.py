"""Tiny random HuggingFace causal-LM models (MoE and dense) and a tiny tokenizer, built in code for tests.

Nothing is downloaded: every model is built from a hand-written config (hidden size 32, 2-3 decoder
layers, 4-8 experts, top-2, vocabulary 64, ``attn_implementation="eager"``) with HF's own random init,
then put in ``.eval()``. HF's init draws every router weight here from ``N(0, 0.02**2)`` (none is left
at the zeros some router ``__init__``s start from), which makes routing almost uniform; so after
construction every router weight is re-drawn from ``N(0, router_std**2)`` (default 0.5; GPT-OSS's
router bias from ``N(0, (router_std / 5)**2)``), and the DeepSeek-V3-style ``e_score_correction_bias``
buffers, which HF's init zeroes, get ``N(0, 0.05**2)`` values.

Family status with transformers 5.23 / torch 2.13 on CPU. Every family in :data:`FAMILIES` builds
and runs a forward on a left-padded ``(2, 7)`` batch (finite logits of the right shape) in well under
2 s; these were tried and left out:

* ``qwen3_vl_moe``: transformers has no text-only causal-LM class for it (only the multimodal
  ``Qwen3VLMoeForConditionalGeneration`` and the headless ``Qwen3VLMoeTextModel``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "FAMILIES",
    "MOE_LAYERS",
    "MOE_NUM_EXPERTS",
    "MOE_ROUTER_CLASS",
    "TINY_VOCAB_SIZE",
    "UNSUPPORTED_ROUTER_CLASS",
    "tiny_dense_model",
    "tiny_model",
    "tiny_tokenizer",
    "tiny_unsupported_moe_model",
]

TINY_VOCAB_SIZE = 64
"""Vocabulary size of every tiny model (the tiny tokenizer's vocabulary is smaller)."""

_PAD_ID, _BOS_ID, _EOS_ID = 0, 2, 3  # ids of <pad>, <s>, </s> in tiny_tokenizer()

# Settings shared by every tiny config: hidden 32, 4 heads of dim 8, 2 KV heads.
_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": _PAD_ID,
    "bos_token_id": _BOS_ID,
    "eos_token_id": _EOS_ID,
    "attn_implementation": "eager",
}

# Multi-head latent attention (DeepSeek-V2/V3): MLA needs num_key_value_heads == num_attention_heads
# (with 2 KV heads the eager attention fails on a 4-vs-8 head shape mismatch); small latent ranks.
_MLA: dict[str, Any] = {
    **_COMMON,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
}


def _granitemoe() -> PreTrainedConfig:
    return transformers.GraniteMoeConfig(**_COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)


def _granitemoeshared() -> PreTrainedConfig:
    return transformers.GraniteMoeSharedConfig(
        **_COMMON,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=16,
    )


def _granitemoehybrid() -> PreTrainedConfig:
    return transformers.GraniteMoeHybridConfig(
        **_COMMON,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=16,
        mamba_n_heads=8,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=4,
    )


def _mixtral() -> PreTrainedConfig:
    return transformers.MixtralConfig(**_COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)


def _minimax() -> PreTrainedConfig:
    return transformers.MiniMaxConfig(
        **_COMMON,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        block_size=4,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _qwen2_moe() -> PreTrainedConfig:
    # Layer 1 is dense (mlp_only_layers), layers 0 and 2 are sparse: a mixed model.
    return transformers.Qwen2MoeConfig(
        **_COMMON,
        num_hidden_layers=3,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        norm_topk_prob=False,
    )


def _qwen3_moe() -> PreTrainedConfig:
    return transformers.Qwen3MoeConfig(
        **_COMMON,
        head_dim=8,
        num_hidden_layers=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )


def _qwen3_next() -> PreTrainedConfig:
    # Gated-DeltaNet (linear) and full attention layers, both with a sparse MLP.
    return transformers.Qwen3NextConfig(
        **_COMMON,
        head_dim=8,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        norm_topk_prob=True,
    )


def _olmoe() -> PreTrainedConfig:
    return transformers.OlmoeConfig(
        **_COMMON, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False
    )


def _flex_olmo() -> PreTrainedConfig:
    return transformers.FlexOlmoConfig(
        **_COMMON, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False
    )


def _deepseek_v2() -> PreTrainedConfig:
    return transformers.DeepseekV2Config(
        **_MLA,
        q_lora_rank=None,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        topk_method="greedy",
        routed_scaling_factor=1.0,
    )


def _deepseek_v2_grouped() -> PreTrainedConfig:
    return transformers.DeepseekV2Config(
        **_MLA,
        q_lora_rank=16,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    )


def _deepseek_v3() -> PreTrainedConfig:
    return transformers.DeepseekV3Config(
        **_MLA,
        q_lora_rank=16,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_mtp_layers=0,
    )


def _glm4_moe() -> PreTrainedConfig:
    return transformers.Glm4MoeConfig(
        **_COMMON,
        head_dim=8,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=6,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=3,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        use_qk_norm=True,
        num_mtp_layers=0,
    )


def _dots1() -> PreTrainedConfig:
    # Same sigmoid/bias router as DeepSeek-V3, here with a single group (as dots.llm1 ships).
    return transformers.Dots1Config(
        **_COMMON,
        head_dim=8,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )


def _gpt_oss() -> PreTrainedConfig:
    return transformers.GptOssConfig(
        **_COMMON,
        head_dim=8,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 2.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _phimoe() -> PreTrainedConfig:
    return transformers.PhimoeConfig(**_COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)


def _llama() -> PreTrainedConfig:
    return transformers.LlamaConfig(**_COMMON, num_hidden_layers=2)


@dataclass(frozen=True)
class _Spec:
    make_config: Callable[[], PreTrainedConfig]
    model_class: str  # the family's *ForCausalLM class in transformers
    router_class: str
    moe_layers: tuple[int, ...]
    num_experts: int


_SPECS: dict[str, _Spec] = {
    "granitemoe": _Spec(_granitemoe, "GraniteMoeForCausalLM", "GraniteMoeTopKRouter", (0, 1), 4),
    "granitemoeshared": _Spec(
        _granitemoeshared, "GraniteMoeSharedForCausalLM", "GraniteMoeSharedTopKRouter", (0, 1), 4
    ),
    "granitemoehybrid": _Spec(
        _granitemoehybrid, "GraniteMoeHybridForCausalLM", "GraniteMoeHybridTopKRouter", (0, 1), 4
    ),
    "mixtral": _Spec(_mixtral, "MixtralForCausalLM", "MixtralTopKRouter", (0, 1), 4),
    "minimax": _Spec(_minimax, "MiniMaxForCausalLM", "MiniMaxTopKRouter", (0, 1), 4),
    "qwen2_moe": _Spec(_qwen2_moe, "Qwen2MoeForCausalLM", "Qwen2MoeTopKRouter", (0, 2), 8),
    "qwen3_moe": _Spec(_qwen3_moe, "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter", (0, 1), 8),
    "qwen3_next": _Spec(_qwen3_next, "Qwen3NextForCausalLM", "Qwen3NextTopKRouter", (0, 1), 8),
    "olmoe": _Spec(_olmoe, "OlmoeForCausalLM", "OlmoeTopKRouter", (0, 1), 8),
    "flex_olmo": _Spec(_flex_olmo, "FlexOlmoForCausalLM", "FlexOlmoTopKRouter", (0, 1), 4),
    "deepseek_v2": _Spec(_deepseek_v2, "DeepseekV2ForCausalLM", "DeepseekV2TopkRouter", (1, 2), 8),
    "deepseek_v2_grouped": _Spec(_deepseek_v2_grouped, "DeepseekV2ForCausalLM", "DeepseekV2TopkRouter", (1, 2), 8),
    "deepseek_v3": _Spec(_deepseek_v3, "DeepseekV3ForCausalLM", "DeepseekV3TopkRouter", (1, 2), 8),
    "glm4_moe": _Spec(_glm4_moe, "Glm4MoeForCausalLM", "Glm4MoeTopkRouter", (1, 2), 6),
    "dots1": _Spec(_dots1, "Dots1ForCausalLM", "Dots1TopkRouter", (1, 2), 4),
    "gpt_oss": _Spec(_gpt_oss, "GptOssForCausalLM", "GptOssTopKRouter", (0, 1), 4),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)
"""Family keys accepted by :func:`tiny_model` (all build and run a forward on CPU)."""

MOE_ROUTER_CLASS: dict[str, str] = {family: spec.router_class for family, spec in _SPECS.items()}
"""Family key -> class name of its router module (``type(module).__name__``)."""

MOE_LAYERS: dict[str, list[int]] = {family: list(spec.moe_layers) for family, spec in _SPECS.items()}
"""Family key -> indices of the decoder layers that hold an MoE block (the others are dense)."""

MOE_NUM_EXPERTS: dict[str, int] = {family: spec.num_experts for family, spec in _SPECS.items()}
"""Family key -> number of routed experts (rows of every router ``weight``)."""

UNSUPPORTED_ROUTER_CLASS = "PhimoeTopKRouter"
"""Router class of :func:`tiny_unsupported_moe_model` (PhiMoE's sparsemixer router)."""


def _randomise_routers(model: PreTrainedModel, router_class: str, router_std: float) -> None:
    """Re-draw router weights (and biases) and give correction-bias buffers small random values."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ != router_class:
                continue
            torch.nn.init.normal_(module.weight, mean=0.0, std=router_std)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                torch.nn.init.normal_(bias, mean=0.0, std=router_std / 5)
            correction = getattr(module, "e_score_correction_bias", None)
            if isinstance(correction, torch.Tensor):
                correction.normal_(mean=0.0, std=0.05)


def _build(
    config: PreTrainedConfig,
    class_name: str,
    router_class: str | None,
    *,
    seed: int,
    dtype: torch.dtype,
    router_std: float,
) -> PreTrainedModel:
    torch.manual_seed(seed)
    model_cls: type[PreTrainedModel] = getattr(transformers, class_name)
    model = model_cls(config)
    if router_class is not None:
        _randomise_routers(model, router_class, router_std)
    return model.to(dtype).eval()


def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, router_std: float = 0.5
) -> PreTrainedModel:
    """Build a tiny random MoE causal LM of ``family`` (one of :data:`FAMILIES`).

    Hidden size 32, 2-3 decoder layers (:data:`MOE_LAYERS` says which are sparse), 4-8 experts,
    top-2 routing, vocabulary :data:`TINY_VOCAB_SIZE`, eager attention, in ``.eval()`` mode. The same
    ``seed`` always gives the same weights. Router weights are re-drawn from ``N(0, router_std**2)``.
    """
    if family not in _SPECS:
        raise ValueError(f"unknown tiny MoE family {family!r}; expected one of {FAMILIES}")
    spec = _SPECS[family]
    return _build(
        spec.make_config(), spec.model_class, spec.router_class, seed=seed, dtype=dtype, router_std=router_std
    )


def tiny_dense_model(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a tiny random dense (non-MoE) ``LlamaForCausalLM`` with the same sizes as the MoE models."""
    return _build(_llama(), "LlamaForCausalLM", None, seed=seed, dtype=dtype, router_std=0.0)


def tiny_unsupported_moe_model(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, router_std: float = 0.5
) -> PreTrainedModel:
    """Build a tiny random ``PhimoeForCausalLM``: an MoE whose sparsemixer router is not supported."""
    return _build(
        _phimoe(),
        "PhimoeForCausalLM",
        UNSUPPORTED_ROUTER_CLASS,
        seed=seed,
        dtype=dtype,
        router_std=router_std,
    )


_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
_WORDS = (
    *("A", "B", "C", "D"),
    *("Question", "Answer", ":", ".", "?", ","),
    *(str(d) for d in range(10)),
    *("the", "a", "is", "what", "which", "of", "and", "yes", "no", "true", "false", "colour", "sky", "blue"),
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer (whitespace pre-tokenizer, left padding) with a vocabulary of
    special tokens, letters A-D, "Question", "Answer", punctuation, digits and a few words.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, matching the tiny models' configs; the
    vocabulary size is below :data:`TINY_VOCAB_SIZE`.
    """
    vocab = {token: i for i, token in enumerate((*_SPECIAL_TOKENS, *_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
