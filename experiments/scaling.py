"""Held-out loss against model size at a fixed token budget, on CPU: the trend the GPT papers rest on.

    python -m omni.sweep experiments/scaling.py

Four GPT-2 sizes (non-embedding parameters 0.1M to 1.8M, ~18x) train on the offline stdlib corpus with the
tiny config's data, tokenizer and mesh, for the same 614,400 tokens each (300 steps of 16 x 128). Heads are
64 wide as in GPT-2/3. The learning rate falls with width: tiny's 3e-3 was tuned at d_model 256 and we scale
it by sqrt(256 / d_model), so wider models take smaller steps (Adam's per-weight step moves a unit's output
in proportion to its fan-in). `report` writes scaling.md and scaling.png (held-out loss against non-embedding
parameters, log x) into the sweep's workdir.
"""
import math
import os

from omni.workdir import Workdir

BASE = "configs/tiny.py"
STEPS, BATCH, SEQ_LEN = 300, 16, 128
TOKENS = STEPS * BATCH * SEQ_LEN

COMMON = {"train.steps": STEPS, "train.batch_size": BATCH, "train.seq_len": SEQ_LEN, "train.log_every": 25,
          "train.eval_every": STEPS, "train.checkpoint_every": 100, "optim.warmup_steps": 30}


def _size(num_layers: int, d_model: int) -> dict:
    lr = round(3e-3 * math.sqrt(256 / d_model), 4)
    return {"name": f"L{num_layers}-d{d_model}", "model.num_layers": num_layers, "model.d_model": d_model,
            "model.num_heads": d_model // 64, "model.d_ff": 4 * d_model, "optim.lr": lr}


RUNS = [_size(2, 64), _size(2, 128), _size(4, 128), _size(4, 192)]


def non_embedding_params(rundir: str, params: int) -> int:
    """Parameters less the token and position embeddings (Kaplan et al. 2020's N)."""
    m = Workdir(rundir).saved_config()["model"]
    return params - (m["vocab_size"] + m["max_len"]) * m["d_model"]


def report(workdir: str, rows: list[dict]) -> None:
    """scaling.md (the table for RESULTS.md) and scaling.png (held-out loss against N, log x)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    points = sorted((non_embedding_params(os.path.join(workdir, r["name"]), r["params"]), r) for r in rows)
    lines = ["| run | non-embedding params | params | lr | tokens | held-out loss | held-out perplexity | "
             "tokens/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {n:,} | {r['params']:,} | {r['optim.lr']} | {TOKENS:,} | {r['eval_loss']:.4f} | "
              f"{r['eval_perplexity']:.2f} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |" for n, r in points]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "scaling.md"), "w") as f:
        f.write(table)
    print(table, flush=True)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([n for n, _ in points], [r["eval_loss"] for _, r in points], "o-")
    for n, r in points:
        ax.annotate(r["name"], (n, r["eval_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel="non-embedding parameters", ylabel="held-out loss (nats/token)",
           title=f"GPT-2 on the stdlib corpus, {TOKENS:,} tokens each")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "scaling.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"[scaling] wrote {path}", flush=True)
