"""Whole pipelines as one command: InstructGPT's stages, each in its own workdir feeding the next through its
Orbax checkpoint, then a report.

    python -m omni.main --config=experiments/instructgpt.py [--workdir=runs/instructgpt] [--config.rounds=2]
                        [--config.ppo_seeds=3] [--config.pretrained=runs/tiny] [--config.dry_run=True]

Steps (each `python -m omni.main --config=<stage config> --config.init_from=<previous> ... --workdir=W/<step>`
in a subprocess, so every stage starts with fresh devices):

    pretrain -> sft -> label (rank SFT samples) -> rm -> ppo (and ppo_ptx)        round 1
    label2 (rank ppo's samples) -> rm2 (from rm) -> ppo2 (from ppo; and ppo_ptx2)  round 2, ...

A step whose workdir holds summary.json is done and skipped; an interrupted one resumes from its checkpoint, so
rerunning the same command picks up where it stopped. With ppo_seeds > 1 every PPO step runs once per seed
(W/ppo-seed1, ...), sharing the reward model. At the end W/report.json, W/report.md and W/reward_kl.png hold
every stage's headline metrics and the policies side by side on held-out prompts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys

import ml_collections
import numpy as np

from omni.config import ConfigError

# summary.json keys reported per stage.
HEADLINES = {
    "pretrain": ("eval_perplexity", "unigram_perplexity", "tokens_per_s"),
    "sft": ("eval_loss", "labeler_score", "exact_match"),
    "label": ("train_ranked_prompts", "train_sample_labeler_score"),
    "rm": ("heldout_pairwise_accuracy", "reward_std", "reward_bias"),
    "ppo": ("reward", "kl", "labeler_score", "win_rate_vs_sft", "kl_to_sft", "pretrain_perplexity"),
}
POLICY_KEYS = ("labeler_score", "sampled_labeler_score", "win_rate_vs_sft", "kl_to_sft", "pretrain_perplexity")


@dataclasses.dataclass(frozen=True)
class Step:
    name: str  # its workdir under the pipeline's
    kind: str  # pretrain | sft | label | rm | ppo
    config: str  # config file
    overrides: tuple[tuple[str, str], ...]


def _overrides(text: str, key: str) -> list[tuple[str, str]]:
    pairs = []
    for item in shlex.split(text):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"config.overrides.{key}={text!r}: expected space-separated KEY=VALUE pairs, got {item!r}")
        pairs.append((name, value))
    return pairs


def plan(c: ml_collections.ConfigDict, workdir: str) -> list[Step]:
    """The pipeline's steps in order."""
    if not isinstance(c.rounds, int) or c.rounds < 1:
        raise ConfigError(f"config.rounds={c.rounds!r}: must be a positive int")
    if not isinstance(c.ppo_seeds, int) or c.ppo_seeds < 1:
        raise ConfigError(f"config.ppo_seeds={c.ppo_seeds!r}: must be a positive int")
    for kind in ("pretrain", "sft", "label", "rm", "ppo"):
        if not os.path.isfile(c.configs[kind]):
            raise ConfigError(f"config.configs.{kind}={c.configs[kind]!r}: no such config file")
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    seed = [("train.seed", str(c.seed))]
    steps = []

    def add(name, kind, extra, variant=None):
        own = _overrides(c.overrides[kind], kind)
        if variant == "ppo_ptx":  # PPO-ptx is PPO plus its own overrides
            own += _overrides(c.overrides.ppo_ptx, "ppo_ptx")
        common = [] if kind == "ppo" else seed  # PPO's seed is per run
        steps.append(Step(name, kind, c.configs[kind], tuple(common + extra + own)))

    pretrained = c.pretrained or path("pretrain")
    if not c.pretrained:
        add("pretrain", "pretrain", [])
    add("sft", "sft", [("init_from", pretrained)])
    variants = [("ppo", [])] + ([("ppo_ptx", [("ppo.ptx_coef", str(c.ptx_coef))])] if c.ptx else [])
    for r in range(1, c.rounds + 1):
        suffix, previous = ("" if r == 1 else str(r)), ("" if r <= 2 else str(r - 1))
        policy = path("sft") if r == 1 else path(f"ppo{previous}")
        add(f"label{suffix}", "label", [("init_from", policy)])
        add(f"rm{suffix}", "rm", [("init_from", path("sft") if r == 1 else path(f"rm{previous}")),
                                  ("data.name", "jsonl"), ("data.path", path(f"label{suffix}/train")),
                                  ("data.eval_path", path(f"label{suffix}/eval"))])
        for variant, extra in variants:
            for s in range(c.ppo_seeds):
                tag = "" if s == 0 else f"-seed{s}"
                start = path("sft") if r == 1 else path(f"{variant}{previous}{tag}")
                add(f"{variant}{suffix}{tag}", "ppo",
                    [("init_from", start), ("ppo.reward_from", path(f"rm{suffix}")),
                     ("ppo.reference_from", path("sft")), ("train.seed", str(c.seed + s))] + extra, variant)
    return steps


def command(step: Step, workdir: str) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in step.overrides]
    return [sys.executable, "-m", "omni.main", f"--config={step.config}", *flags,
            f"--workdir={os.path.join(workdir, step.name)}"]


def _summary(workdir: str, name: str) -> dict | None:
    path = os.path.join(workdir, name, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(c: ml_collections.ConfigDict, workdir: str) -> int:
    steps = plan(c, workdir)
    if c.dry_run:
        print("\n".join(shlex.join(command(s, workdir)) for s in steps), flush=True)
        return 0
    os.makedirs(workdir, exist_ok=True)
    for i, step in enumerate(steps, 1):
        if _summary(workdir, step.name) is not None:
            print(f"[pipeline] {i}/{len(steps)} {step.name}: done, skipped", flush=True)
            continue
        cmd = command(step, workdir)
        print(f"[pipeline] {i}/{len(steps)} {step.name}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0 or _summary(workdir, step.name) is None:  # a preempted stage exits 0 without a summary
            print(f"[pipeline] {step.name} did not finish (exit code {rc}); finished steps are kept: rerun the same "
                  "command to go on from there", file=sys.stderr, flush=True)
            return rc or 1
    report = write_report(c, workdir, steps)
    print(report_markdown(report), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Report

def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "seeds": values}


def write_report(c: ml_collections.ConfigDict, workdir: str, steps: list[Step]) -> dict:
    """report.json (every stage's headline metrics; per policy its held-out numbers, over seeds), report.md and
    reward_kl.png (RM reward and KL to the reference per PPO iteration)."""
    summaries = {s.name: _summary(workdir, s.name) for s in steps}
    stages = {s.name: {k: summaries[s.name].get(k) for k in HEADLINES[s.kind] + ("wall_s",) if k in summaries[s.name]}
              for s in steps}
    last = "" if c.rounds == 1 else str(c.rounds)
    variants = ["ppo"] + (["ppo_ptx"] if c.ptx else [])
    runs = {v: [summaries[f"{v}{last}{'' if s == 0 else f'-seed{s}'}"] for s in range(c.ppo_seeds)] for v in variants}
    first = runs["ppo"][0]
    policies = {"sft": {"labeler_score": first.get("sft_labeler_score"), "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                        "sampled_labeler_score": first.get("sft_sampled_labeler_score"),
                        "pretrain_perplexity": first.get("sft_pretrain_perplexity")}}
    for v, summaries_v in runs.items():
        policies[v] = {k: float(np.mean([s[k] for s in summaries_v])) for k in POLICY_KEYS if k in first}
        policies[v]["seeds"] = {k: [s[k] for s in summaries_v] for k in POLICY_KEYS if k in first}
        margins = [s["labeler_score"] - s["sft_labeler_score"] for s in summaries_v if "labeler_score" in s]
        if margins:
            policies[v]["margin_vs_sft"] = _mean_std(margins)
    report = {"workdir": workdir, "rounds": c.rounds, "ppo_seeds": c.ppo_seeds, "stages": stages,
              "policies": policies, "wall_s": sum(v.get("wall_s", 0.0) for v in stages.values())}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report_markdown(report))
    _plot(workdir, [s.name for s in steps if s.kind == "ppo"])
    return report


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_markdown(report: dict) -> str:
    lines = [f"# InstructGPT pipeline: {report['workdir']}", "",
             f"{report['rounds']} round(s), {report['ppo_seeds']} PPO seed(s); stages took "
             f"{report['wall_s'] / 60:.1f} min in all.", "", "| stage | headline metrics | wall s |", "|---|---|---|"]
    for name, m in report["stages"].items():
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k != "wall_s")
        lines.append(f"| {name} | {metrics} | {m.get('wall_s', 0):.0f} |")
    lines += ["", "Held-out prompts (greedy answers; `sampled` at the rollout temperature); mean over PPO seeds "
              "(± std of the margin over SFT):", "",
              "| policy | labeler score | margin vs SFT | win rate vs SFT | KL to SFT | sampled labeler score | "
              "pretraining perplexity |", "|---|---|---|---|---|---|---|"]
    for name, p in report["policies"].items():
        margin = p.get("margin_vs_sft")
        margin = f"{margin['mean']:+.4f} ± {margin['std']:.4f}" if margin else "0"
        lines.append(f"| {name} | {_fmt(p.get('labeler_score'))} | {margin} | {_fmt(p.get('win_rate_vs_sft'))} | "
                     f"{_fmt(p.get('kl_to_sft'))} | {_fmt(p.get('sampled_labeler_score'))} | "
                     f"{_fmt(p.get('pretrain_perplexity'))} |")
    return "\n".join(lines) + "\n"


def _plot(workdir: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = []
        with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "reward" in r and "iteration" in r]
        iterations = [r["iteration"] for r in rows]
        reward_ax.plot(iterations, [r["reward"] for r in rows], label=name)
        kl_ax.plot(iterations, [r["kl"] for r in rows], label=name)
    reward_ax.set(xlabel="PPO iteration", ylabel="mean reward-model score of the rollouts", title="reward")
    kl_ax.set(xlabel="PPO iteration", ylabel="KL to the SFT policy (nats per response)", title="KL")
    reward_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "reward_kl.png"), dpi=100)
    plt.close(fig)
