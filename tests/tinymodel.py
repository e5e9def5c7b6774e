"""Tiny random-weight GGUF models that a real llama-server loads in milliseconds.

Architecture `llama`, F32, 128 wide and 2 layers by default (about 1.6 MB). The
vocabulary is SentencePiece-style ("llama" tokenizer model) with byte fallback,
so every byte of any text tokenises; without all 256 `<0xNN>` byte tokens
llama-server fails to tokenise. The output is random bytes: tests assert on
structure, never on content.

    python -m tests.tinymodel out.gguf [--kind chat|code] [--seed N]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
PIECES = ("\u2581", "\u2581the", "\u2581a", "\u2581of", "\u2581and", "\u2581to", "e", "t", "\u2581def", "\u2581return")


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "chat"  # "chat", or "code" (adds fill-in-the-middle tokens for /infill)
    seed: int = 0
    n_embd: int = 128
    n_layer: int = 2
    n_ff: int = 256
    n_head: int = 2
    n_ctx_train: int = 4096


def _vocabulary(fim: bool) -> tuple[list[str], list[float], list[int]]:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    if fim:
        tokens += list(FIM_TOKENS)
        types += [T.CONTROL] * len(FIM_TOKENS)
    tokens += list(PIECES)
    types += [T.NORMAL] * len(PIECES)
    scores = [0.0] * len(tokens)
    for i, token_type in enumerate(types):
        if token_type == T.NORMAL:
            scores[i] = -float(i)
    return tokens, scores, [int(t) for t in types]


def write_model(path: str | Path, spec: ModelSpec = ModelSpec()) -> Path:
    """Write the model described by `spec` to `path`; the same spec always gives the same bytes."""
    if spec.kind not in ("chat", "code"):
        raise ValueError(f"kind must be 'chat' or 'code', got {spec.kind!r}")
    path = Path(path)
    fim = spec.kind == "code"
    tokens, scores, types = _vocabulary(fim)
    rng = np.random.default_rng(spec.seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head_dim = spec.n_embd // spec.n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"olla-tiny-{spec.kind}")
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if fim:
        first = tokens.index(FIM_TOKENS[0])
        w.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, first)
        w.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, first + 1)
        w.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, first + 2)
    w.add_chat_template(CHATML)

    n_vocab, d, ff = len(tokens), spec.n_embd, spec.n_ff
    w.add_tensor("token_embd.weight", weights(n_vocab, d))
    for i in range(spec.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weights(d, d))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weights(ff, d))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weights(ff, d))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weights(d, ff))
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("output.weight", weights(n_vocab, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--kind", choices=("chat", "code"), default="chat")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_model(args.path, ModelSpec(kind=args.kind, seed=args.seed)))


if __name__ == "__main__":
    main()
