"""The paper's effect in miniature: SFT, then DPO toward a rule reward, then `expo search` on partial DPO checkpoints.

A tiny Llama (hidden 64, 2 layers, vocab 128 words of a synthetic language, tokenizer built with `tokenizers`) is
trained by SFT to answer a prompt of words with 8 random words and an end token. DPO (the loss written out, against
the frozen SFT model as reference, beta 0.1) then pushes it toward the rule reward: the share of "good" words
(w8 .. w23) in the response, minus 0.1 per word past 12. Checkpoints are saved at 10, 20, 40 and 100 % of the DPO
steps, and on each one `expo search --alpha auto` (budget 8) picks alpha; an exhaustive grid of 12 alphas is
evaluated too, to see what the search missed. Prints a Markdown report (the paper's Table 2 in miniature).

    python benchmarks/bench_search_toy.py --workdir /tmp/toy [--markdown docs/search.md]
                                          [--backend transformers,vllm --heads 1]

`--backend` lists the inference backends to search with, on the same checkpoints and prompts (vllm: in a venv with
vllm installed; its CPU attention needs head_dim 64, hence `--heads 1` for hidden 64). `--heads` changes the toy
model, so compare backends within one run.

A few minutes on 2 cores. Everything is seeded; the numbers repeat on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

GOOD = set(range(8, 24))
PROMPTS, PROMPT_LEN, RESPONSE_LEN = 48, 4, 8
GRID = (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24)


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    t.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}w4 {% endif %}")
    return t


HEADS = [4]  # attention heads (hidden 64): --heads


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS[0],
                      num_key_value_heads=max(1, HEADS[0] // 2), vocab_size=128, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def prompt_ids(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(24, 128, (n, PROMPT_LEN), generator=g)


def batch(prompts: torch.Tensor, responses: torch.Tensor):
    """Token ids [prompt, w4 (the assistant marker), response, </s>] and the mask of the response positions."""
    n = prompts.shape[0]
    marker = torch.full((n, 1), 4)
    eos = torch.full((n, 1), 2)
    ids = torch.cat([prompts, marker, responses, eos], 1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, PROMPT_LEN + 1:] = True
    return ids, mask


def logprob(m, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = m(ids[:, :-1]).logits
    lp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(1)


def sft(m, steps: int, g: torch.Generator) -> None:
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(steps):
        ids, mask = batch(prompt_ids(g, 64), torch.randint(4, 128, (64, RESPONSE_LEN), generator=g))
        loss = -logprob(m, ids, mask).mean() / (RESPONSE_LEN + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()


def rule(tokens: list[int]) -> float:
    words = [t for t in tokens if t >= 4]
    if not words:
        return 0.0
    return sum(t in GOOD for t in words) / len(words) - 0.1 * max(0, len(words) - 12)


def dpo(policy, ref, steps: int, saves: dict[int, str], g: torch.Generator, tok) -> None:
    """DPO on pairs of random responses, the one the rule prefers chosen; a bf16 copy of the policy (trained in
    float32) is saved at each step in `saves`."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    for step in range(1, steps + 1):
        prompts = prompt_ids(g, 32)
        a = torch.randint(4, 128, (32, RESPONSE_LEN), generator=g)
        b = torch.randint(4, 128, (32, RESPONSE_LEN), generator=g)
        swap = torch.tensor([rule(x.tolist()) < rule(y.tolist()) for x, y in zip(a, b, strict=True)])
        chosen, rejected = torch.where(swap[:, None], b, a), torch.where(swap[:, None], a, b)
        ids_c, mask = batch(prompts, chosen)
        ids_r, _ = batch(prompts, rejected)
        with torch.no_grad():
            ref_c, ref_r = logprob(ref, ids_c, mask), logprob(ref, ids_r, mask)
        margin = (logprob(policy, ids_c, mask) - ref_c) - (logprob(policy, ids_r, mask) - ref_r)
        loss = -F.logsigmoid(0.1 * margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in saves:
            copy = model()
            copy.load_state_dict(policy.state_dict())
            copy.to(torch.bfloat16).save_pretrained(saves[step])
            tok.save_pretrained(saves[step])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--dpo-steps", type=int, default=300)
    p.add_argument("--markdown", metavar="FILE", help="append the report to FILE")
    p.add_argument("--backend", default="transformers", help="comma-separated: transformers, vllm")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the toy model (hidden 64)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy, one sample a "
                   "prompt (the backends then draw no random numbers, so they can be compared response by response)")
    args = p.parse_args()
    HEADS[0] = args.heads
    backends = args.backend.split(",")
    from expo_engine import search

    os.makedirs(args.workdir, exist_ok=True)
    sys.path.insert(0, os.path.abspath(args.workdir))  # toy_reward, importable by reward_fn
    with open(os.path.join(args.workdir, "toy_reward.py"), "w") as f:
        f.write(f"GOOD = {sorted(GOOD)!r}\n\n\ndef score(prompt, response):\n"
                "    words = [w for w in response.split() if w.startswith('w') and w[1:].isdigit()]\n"
                "    if not words:\n        return 0.0\n"
                "    return sum(int(w[1:]) in GOOD for w in words) / len(words) - 0.1 * max(0, len(words) - 12)\n")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tok = tokenizer()
    started = time.monotonic()
    sft_dir = os.path.join(args.workdir, "sft")
    base = model()
    sft(base, args.sft_steps, g)
    base = base.to(torch.bfloat16).float()  # the checkpoints are bf16: train DPO from what is saved
    base.to(torch.bfloat16).save_pretrained(sft_dir)
    tok.save_pretrained(sft_dir)
    ref = model()
    ref.load_state_dict(base.state_dict())
    ref.eval()
    policy = model()
    policy.load_state_dict(base.state_dict())
    fractions = (0.1, 0.2, 0.4, 1.0)
    saves = {max(1, round(f * args.dpo_steps)): os.path.join(args.workdir, f"dpo-{round(f * 100)}") for f in fractions}
    dpo(policy, ref, args.dpo_steps, saves, g, tok)
    trained = time.monotonic() - started
    prompts = os.path.join(args.workdir, "prompts.txt")
    pg = torch.Generator().manual_seed(123)
    with open(prompts, "w") as f:
        for row in prompt_ids(pg, PROMPTS):
            f.write(" ".join(f"w{t}" for t in row.tolist()) + "\n")
    samples = 1 if args.temperature == 0 else 2
    common = dict(reward_fn="toy_reward:score", max_new_tokens=16, samples=samples, device="cpu", batch_size=48,
                  temperature=args.temperature)
    rows = []
    sft_reward = None
    for step, folder in sorted(saves.items()):
        for backend in backends:
            t = time.monotonic()
            tag = "" if backend == "transformers" else f"-{backend}"
            auto = search(sft_dir, folder, prompts, folder + f"-search{tag}", alpha="auto", budget=8,
                          backend=backend, **common)
            t_auto = time.monotonic() - t
            grid = search(sft_dir, folder, prompts, folder + f"-grid{tag}", alpha=",".join(map(str, GRID)),
                          backend=backend, holdout=0, **common)
            if sft_reward is None:
                sft_reward = search(sft_dir, sft_dir, prompts, os.path.join(args.workdir, "sft-eval"), alpha="0",
                                    holdout=0, **common)["evaluations"][0]
            rows.append((step, backend, auto, grid, t_auto))
            h = auto["holdout"]
            print(f"DPO {step} steps, {backend}: aligned {auto['evaluations'][0]['reward_mean']:.3f}, search alpha "
                  f"{auto['best']['alpha']:g} -> {auto['best']['reward_mean']:.3f} in {len(auto['evaluations'])} "
                  f"evaluations, held out {h['improvement']:+.3f} +- {h['improvement_stderr']:.3f}; grid best "
                  f"{grid['best']['alpha']:g} -> {grid['best']['reward_mean']:.3f}", file=sys.stderr, flush=True)
    lines = ["### The toy reproduction (`benchmarks/bench_search_toy.py`)", "",
             f"- command: `python benchmarks/bench_search_toy.py {' '.join(sys.argv[1:])}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} cores, "
             f"{platform.platform()}; torch {torch.__version__}",
             f"- SFT {args.sft_steps} steps, DPO {args.dpo_steps} steps (beta 0.1, lr 1e-4), {args.heads} attention "
             f"head(s), training {trained:.0f} s; {PROMPTS} prompts x {samples} sample(s) (the search: 36 choose "
             f"alpha, 12 held out; the grid: all 48), max 16 new tokens, temperature {args.temperature:g}, seed 42",
             f"- reward: share of good words minus 0.1 per word past 12; SFT model: "
             f"{sft_reward['reward_mean']:.3f} ± {sft_reward['reward_stderr']:.3f}", "",
             "| checkpoint | backend | aligned reward | + ExPO (search) | alpha chosen | evaluations | win rate vs "
             "aligned | held out: improvement (win rate) | exhaustive grid best (alpha) | search s (weights, "
             "generation, scoring) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for step, backend, auto, grid, secs in rows:
        a0, b, gb, h = auto["evaluations"][0], auto["best"], grid["best"], auto["holdout"]
        spent = {k: sum(e[k] for e in auto["evaluations"]) for k in ("weights_seconds", "generate_seconds",
                                                                      "score_seconds")}
        lines.append(f"| DPO {round(100 * step / args.dpo_steps)} % ({step} steps) | {backend} | "
                     f"{a0['reward_mean']:.3f} ± {a0['reward_stderr']:.3f} | {b['reward_mean']:.3f} ± "
                     f"{b['reward_stderr']:.3f} | {b['alpha']:g} | {len(auto['evaluations'])} | "
                     f"{b['win_rate_vs_aligned']:.2f} | {h['improvement']:+.3f} ± {h['improvement_stderr']:.3f} "
                     f"({h['win_rate_vs_aligned']:.2f}) | {gb['reward_mean']:.3f} ({gb['alpha']:g}) | {secs:.0f} "
                     f"({spent['weights_seconds']:.1f}, {spent['generate_seconds']:.1f}, "
                     f"{spent['score_seconds']:.1f}) |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + report)
    json.dump({"rows": [{"step": s, "backend": be, "auto": a, "grid": gr} for s, be, a, gr, _ in rows]},
              open(os.path.join(args.workdir, "toy.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
