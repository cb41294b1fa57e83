"""Peak memory of `expo search` against the model it holds: one model plus the engine's chunk buffers.

Builds a ~1.1 GB bf16 Llama pair (hidden 2048, 8 layers, vocab 32000; random weights, a word-level tokenizer),
then runs, each in its own process and measured by the kernel (ru_maxrss of the child):
- baseline: transformers loads the aligned model and generates once (what any evaluation needs at least);
- `expo search --alpha 1` (two evaluations: alpha 0 and 1, each streaming both checkpoints into the weights).

    python benchmarks/bench_search_memory.py --workdir /tmp/searchmem [--markdown docs/search.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

BASELINE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").eval()
ids = tok(["w10 w11 w12", "w20 w21 w22"], return_tensors="pt", padding=True)
torch.manual_seed(0)
with torch.no_grad():
    m.generate(**ids, do_sample=True, max_new_tokens=4, pad_token_id=0)
"""


def build(workdir: str) -> tuple[str, str, int]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sft, aligned = os.path.join(workdir, "sft"), os.path.join(workdir, "aligned")
    vocab = 32000
    if not os.path.exists(os.path.join(aligned, "config.json")):
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                          num_key_value_heads=16, vocab_size=vocab, max_position_embeddings=256,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab)}
        t = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
        m.save_pretrained(sft)
        tok.save_pretrained(sft)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((torch.randn_like(p, dtype=torch.float32) * 0.002).to(p.dtype))
        m.save_pretrained(aligned)
        tok.save_pretrained(aligned)
    size = sum(os.path.getsize(os.path.join(aligned, f)) for f in os.listdir(aligned) if f.endswith(".safetensors"))
    return sft, aligned, size


def peak(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of one command, from GNU time's %M (the kernel's ru_maxrss of it)."""
    t = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], capture_output=True, text=True)
    wall = time.monotonic() - t
    if done.returncode:
        sys.exit(f"{cmd[:3]} failed:\n{done.stderr[-3000:]}")
    kb = [int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("maxrss_kb ")]
    return kb[-1] * 1024, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    sft, aligned, size = build(args.workdir)
    prompts = os.path.join(args.workdir, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("w10 w11 w12\nw20 w21 w22\n")
    rep = os.path.join(args.workdir, "rep")
    shutil.rmtree(rep, ignore_errors=True)  # a report already there would be resumed: nothing evaluated
    rss_search, wall_search = peak([sys.executable, "-m", "expo_engine.cli", "search", "--sft", sft, "--aligned",
                                    aligned, "--prompts", prompts, "--report", rep,
                                    "--reward-cmd", "awk '{print length($0)}'", "--alpha", "1",
                                    "--max-new-tokens", "4", "--device", "cpu", "--no-chat-template"])
    rss_base, wall_base = peak([sys.executable, "-c", BASELINE, aligned])
    gib = 2**30
    lines = ["### Peak memory (`benchmarks/bench_search_memory.py`)", "",
             f"- command: `python benchmarks/bench_search_memory.py {' '.join(sys.argv[1:])}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} cores, {platform.platform()}",
             f"- model: {size / gib:.2f} GiB of bf16 weights (hidden 2048, 8 layers, vocab 32000)", "",
             "| process | peak RSS GiB | minus the model GiB | wall s |", "|---|---|---|---|",
             f"| transformers: load the aligned model, generate once | {rss_base / gib:.2f} | "
             f"{(rss_base - size) / gib:.2f} | {wall_base:.1f} |",
             f"| `expo search --alpha 1` (2 evaluations, both checkpoints streamed into the weights twice) | "
             f"{rss_search / gib:.2f} | {(rss_search - size) / gib:.2f} | {wall_search:.1f} |"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
