"""Write a tiny GGUF chat model: random weights, real tokenizer, real chat template.

Why: llama-server needs a model to serve, and there is no hub here. What the
prefix-cache tests need from the model is not quality but a real tokenizer
and template, and a forward pass cheap enough for 2 cores. So: a 2-layer
Qwen2- or Llama-shaped network with small dimensions and random (seeded)
weights, the tokenizer fields copied from llama.cpp's vocab-only GGUF files,
and the chosen chat template embedded as ``tokenizer.chat_template``.
"""

from __future__ import annotations

from pathlib import Path

from kvern.tokenize.gguf import read_gguf_metadata

_COPY_PREFIX = "tokenizer.ggml."


def write_tiny_model(
    vocab_gguf: Path,
    template: str,
    out: Path,
    *,
    arch: str = "qwen2",
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 8192,
    seed: int = 0,
) -> Path:
    """Write the model to ``out`` (atomically) and return it."""
    import gguf
    import numpy as np

    meta = read_gguf_metadata(vocab_gguf)
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(f"kvern-tiny-{arch}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if arch == "llama":
        writer.add_rope_dimension_count(n_embd // n_head)

    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(_COPY_PREFIX + key)
        if value is not None:
            getattr(writer, f"add_{key.replace('padding', 'pad')}")(int(value))
    if meta.get(_COPY_PREFIX + "add_bos_token") is not None:
        writer.add_add_bos_token(bool(meta[_COPY_PREFIX + "add_bos_token"]))
    writer.add_chat_template(template)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    n_embd_kv = n_embd // n_head * n_head_kv
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", ones(n_embd))
    writer.add_tensor("output.weight", w(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones(n_embd))
        writer.add_tensor(p + "attn_q.weight", w(n_embd, n_embd))
        writer.add_tensor(p + "attn_k.weight", w(n_embd_kv, n_embd))
        writer.add_tensor(p + "attn_v.weight", w(n_embd_kv, n_embd))
        if arch == "qwen2":
            writer.add_tensor(p + "attn_q.bias", np.zeros(n_embd, dtype=np.float32))
            writer.add_tensor(p + "attn_k.bias", np.zeros(n_embd_kv, dtype=np.float32))
            writer.add_tensor(p + "attn_v.bias", np.zeros(n_embd_kv, dtype=np.float32))
        writer.add_tensor(p + "attn_output.weight", w(n_embd, n_embd))
        writer.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        writer.add_tensor(p + "ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(p + "ffn_down.weight", w(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out
