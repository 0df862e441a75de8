"""A short end-to-end run on a tiny Granite-MoE built in code: patch, sample, predict, unpatch.

The model has random weights (hidden 64, 3 layers, 8 experts, top-2) and a word-level tokenizer
built with ``tokenizers``; its answers mean nothing. What the run shows is the machinery, with
every claim checked on the spot:

1. the routers of layers 1 and 2 become Pyro sample sites (per-token logits, prior scale 2);
2. pinned at the prior mean, the patched model computes the HF model's logits;
3. sampling changes the selected experts of some tokens, layer by layer;
4. ``routing-average`` and ``model-average`` predictions (S = 16) against the deterministic one;
5. ``unpatch`` gives back the HF model, bitwise.

    python -m pyro_moe.experiments.demo
"""

from __future__ import annotations

import argparse

import pyro
import torch
from pyro import poutine
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM, PreTrainedTokenizerFast

from pyro_moe import at_prior_mean, find_moe_routers, patch_routers, predict

__all__ = ["QUESTIONS", "build_model", "build_tokenizer", "main"]

QUESTIONS = [
    "Question : 3 plus 4 is ? A . 7 B . 5 C . 9 D . 1 Answer :",
    "Question : which colour is the sky ? A . red B . blue C . green D . black Answer :",
    "Question : 9 minus 2 is ? A . 6 B . 8 C . 7 D . 11 Answer :",
    "Question : is ice cold ? A . yes B . no C . hot D . 4 Answer :",
]
LETTERS = ["A", "B", "C", "D"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the demo's words, left padding."""
    words = sorted({word for question in QUESTIONS for word in question.split()})
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", padding_side="left")


def build_model(vocab_size: int, seed: int) -> GraniteMoeForCausalLM:
    """A random Granite-MoE: hidden 64, 3 layers, 8 experts, top-2."""
    torch.manual_seed(seed)
    config = GraniteMoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        pad_token_id=0,
        initializer_range=0.2,
    )
    return GraniteMoeForCausalLM(config).eval()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``(...,)`` in nats of ``probs`` ``(..., choices)``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pyro-moe demo on a tiny random Granite-MoE.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and of the sampling")
    parser.add_argument("--samples", type=int, default=16, help="S, samples of the routing")
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), args.seed)
    batch = tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    letters = torch.tensor(tokenizer.convert_tokens_to_ids(LETTERS))
    reference = model(ids, attention_mask=mask).logits
    deterministic = torch.softmax(reference[:, -1, letters], dim=-1)

    routers = find_moe_routers(model)
    print(f"Model: {type(model).__name__}, {len(routers)} MoE layers, router family '{routers[0].family.name}'.")
    handle = patch_routers(model, {"logits": 2.0}, layers=[1, 2])
    print(f"Patched layers {[loc.layer_index for loc in handle.locations]}: sample sites")
    trace = poutine.trace(model).get_trace(ids, attention_mask=mask)
    for name in handle.site_names:
        print(f"  {name}  value {tuple(trace.nodes[name]['value'].shape)}  (tokens, experts)")

    with at_prior_mean():
        pinned = model(ids, attention_mask=mask).logits
    print(f"At the prior mean, max |patched - HF| logit difference: {(pinned - reference).abs().max():.2e}")

    chosen: dict[str, list[torch.Tensor]] = {path: [] for path in handle.routers}
    hooks = [
        router.register_forward_hook(lambda m, a, out, path=path: chosen[path].append(out[2].sort(-1).values))
        for path, router in handle.routers.items()
    ]
    pyro.set_rng_seed(args.seed)
    with at_prior_mean():
        model(ids, attention_mask=mask)
    model(ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    real = mask.reshape(-1).bool()
    for path, (pinned_index, sampled_index) in chosen.items():
        changed = (pinned_index != sampled_index).any(-1)[real].float().mean()
        print(f"One sample changes the expert set of {changed:.0%} of the tokens in {path}")

    rows = []
    for mode in ("routing-average", "model-average"):
        prediction = predict(
            handle,
            ids,
            mask,
            answer_token_ids=letters,
            num_samples=args.samples,
            mode=mode,
            return_samples=True,
        )
        rows.append((mode, prediction))
    print(f"\nAnswer distributions (S = {args.samples}); entropy in nats, log 4 = {torch.log(torch.tensor(4.0)):.3f}")
    print(f"{'question':>8} | {'deterministic':>22} | {'routing-average':>22} | {'model-average':>22}")
    for q in range(len(QUESTIONS)):
        cells = [deterministic[q]] + [prediction.probs[q] for _, prediction in rows]
        print(
            f"{q:>8} | "
            + " | ".join(f"{LETTERS[int(p.argmax())]} p={p.max():.3f} H={entropy(p):.3f}".rjust(22) for p in cells)
        )
    model_average = rows[1][1]
    mutual_information = entropy(model_average.probs) - entropy(model_average.sample_probs).mean(0)
    print(f"Mutual information of the answer over model-average samples: {mutual_information.numpy().round(4)}")

    handle.unpatch()
    restored = torch.equal(model(ids, attention_mask=mask).logits, reference)
    print(f"\nAfter unpatch the model's logits are bitwise the HF model's: {restored}")
    print("(Random weights: the answers mean nothing; the trained benchmark model arrives with the evaluation suite.)")


if __name__ == "__main__":
    main()
