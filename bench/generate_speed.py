"""Greedy decoding speed: lmforge without a KV cache, with one, and transformers' `generate` on the same
model exported to Llama, same prompt, same run.

    .venv/bin/python bench/generate_speed.py [--device cpu|cuda] [--batch 1] [--new-tokens 128]

A random decoder (default ~14M parameters: d_model 384, 6 layers, an 8192-word vocabulary) is exported
with lmforge's exporter and loaded back with AutoModelForCausalLM. EOS is switched off on both sides so
every run decodes exactly --new-tokens tokens; each timing is the best of --rounds after a warm-up.
Prints tokens/s (new tokens of all rows), the ratios, and whether the three produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.eval.generate import Sampling, document_start, generate_ids
from lmforge.export.hf import export_hf_llama
from lmforge.models import build_model, count_params
from lmforge.models.decoder import DecoderConfig
from lmforge.tokenizer.special_tokens import infer_special_tokens

NO_EOS = -1  # an id no token has: decoding runs the full length


def word_tokenizer(vocab_size: int, path: Path) -> Tokenizer:
    """A word-level tokenizer (w2, w3, ...) with lmforge's EOS and pad first; enough for an export."""
    vocab = ["<|endoftext|>", "<|pad|>", *(f"w{i}" for i in range(2, vocab_size))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(vocab[:2])
    tokenizer.save(str(path))
    return tokenizer


def best_time(fn: Callable[[], list[list[int]]], rounds: int, device: torch.device) -> tuple[float, list[list[int]]]:
    """Seconds of the fastest of `rounds` calls after one warm-up, and the tokens it produced."""
    out = fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="generate_speed_"))
    tokenizer = word_tokenizer(args.vocab, tmp / "tokenizer.json")
    cfg = DecoderConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        max_seq_len=args.prompt_tokens + args.new_tokens)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = export_hf_llama(model, cfg, tmp / "tokenizer.json", tmp / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                           attn_implementation="sdpa").to(device).eval()
    model.to(device)
    special = infer_special_tokens(tokenizer)
    words = " ".join(f"w{2 + (7 * i) % (args.vocab - 2)}" for i in range(args.prompt_tokens - 1))
    prompt = document_start(special) + tokenizer.encode(words).ids
    prompts = [prompt] * args.batch
    greedy = Sampling(temperature=0.0, top_k=0, top_p=1.0)

    def ours(use_cache: bool) -> Callable[[], list[list[int]]]:
        return lambda: generate_ids(model, prompts, NO_EOS, greedy, args.new_tokens, device=device,
                                    use_cache=use_cache)

    ids = torch.tensor(prompts, device=device)

    @torch.no_grad()
    def theirs() -> list[list[int]]:
        new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                          min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=special.pad)
        return new[:, ids.shape[1]:].tolist()

    timings = {name: best_time(fn, args.rounds, device) for name, fn in
               (("uncached", ours(False)), ("cached", ours(True)), ("transformers", theirs))}
    tokens = args.batch * args.new_tokens
    tok_s = {name: tokens / seconds for name, (seconds, _) in timings.items()}
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "params_m": round(count_params(model) / 1e6, 1), "batch": args.batch, "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens, "tok_s": {k: round(v, 1) for k, v in tok_s.items()},
        "cached_over_uncached": round(tok_s["cached"] / tok_s["uncached"], 2),
        "cached_over_transformers": round(tok_s["cached"] / tok_s["transformers"], 2),
        "same_tokens": timings["cached"][1] == timings["uncached"][1] == timings["transformers"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
