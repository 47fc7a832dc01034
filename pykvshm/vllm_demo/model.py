"""The workloads' model: a seeded random Llama with Llama-3.2-1B's layer geometry and an offline tokenizer.

    python -m pykvshm.vllm_demo.model DIR [LAYERS] [SEED] [SHAPE]

writes, into DIR, a Hugging Face model folder that ``vllm serve`` loads without the hub:

* ``config.json`` + ``model.safetensors``: ``LlamaForCausalLM`` with Llama-3.2-1B's per-layer
  shape (hidden 2048, 32 query heads and 8 KV heads of 64, MLP 8192, RoPE theta 500000), random
  weights from ``torch.manual_seed(SEED)``. Only the depth (LAYERS, default 2 of 16) and the
  vocabulary (8192 of 128256) are cut, so one prefill token costs what a layer of the real model
  costs and a CPU runs a workload in minutes. KV per token and layer: 2 x 8 x 64 x 4 B = 4 KiB (fp32).
  SHAPE ``tiny`` (hidden 256, 4 heads, 2 KV heads) is for the CI's reduced workloads.
* ``tokenizer.json`` + ``tokenizer_config.json``: a word-level tokenizer (``tokenizers``, no
  training data) over 8189 made-up words ``ba``, ``be``, ... plus ``<unk>``, ``<s>``, ``</s>``.
  Text is split on whitespace, one word one token, and decoded with single spaces, so a text
  re-encodes to the same ids and a conversation's history tokenizes to a prefix of the next turn's
  prompt (what a prefix cache needs). Text prompts, vLLM's benchmark client and its datasets work.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any

VOCAB = 8192
SPECIAL = ("<unk>", "<s>", "</s>")


def llama_1b_geometry(layers: int = 2) -> dict[str, Any]:
    """Llama-3.2-1B's config (meta-llama/Llama-3.2-1B config.json) with ``layers`` layers and an 8192-word vocabulary."""
    return dict(vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2)


def tiny_geometry(layers: int = 2) -> dict[str, Any]:
    """A small Llama (hidden 256, 4 heads, 2 KV heads) with the same tokenizer: the CI's reduced workloads."""
    return dict(llama_1b_geometry(layers), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64)


SHAPES = {"llama-1b": llama_1b_geometry, "tiny": tiny_geometry}


def words(n: int) -> list[str]:
    """``n`` distinct lower-case pseudo-words, shortest first (syllables of a consonant and a vowel)."""
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]  # 75
    out: list[str] = []
    for k in itertools.count(1):
        for combo in itertools.product(syllables, repeat=k):
            out.append("".join(combo))
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def write_tokenizer(path: str, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *words(vocab_size - len(SPECIAL))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=8192)
    fast.save_pretrained(path)


def write_model(path: str, layers: int = 2, seed: int = 0, shape: str = "llama-1b") -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    geometry = SHAPES[shape](layers)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**geometry)).eval().save_pretrained(path)
    write_tokenizer(path, geometry["vocab_size"])
    return geometry


if __name__ == "__main__":
    a = sys.argv[1:]
    g = write_model(a[0], int(a[1]) if len(a) > 1 else 2, int(a[2]) if len(a) > 2 else 0,
                    a[3] if len(a) > 3 else "llama-1b")
    print(json.dumps({"path": os.path.abspath(a[0]), **g}))
