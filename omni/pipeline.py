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
import os
import shlex
import subprocess
import sys

import ml_collections
import numpy as np

from omni.config import ConfigError
from omni.stages import registry
from omni.workdir import Workdir, write_atomic, write_json
# Held-out measures of a policy in a PPO step's summary (the SFT reference's carry the prefix sft_); per task too,
# as "<measure>/<task>".
POLICY_KEYS = ("labeler_score", "exact_match", "sampled_labeler_score", "pass@1", "pass@8", "win_rate_vs_sft",
               "kl_to_sft", "best_of_8", "rm_agreement", "pretrain_perplexity")
PER_TASK = ("labeler_score", "exact_match", "pass@1", "pass@8")


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
    if not isinstance(c.suite_seed, int) or c.suite_seed < 0:
        raise ConfigError(f"config.suite_seed={c.suite_seed!r}: must be an int >= 0")
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    steps = []

    def add(name, kind, extra, variant=None):
        own = _overrides(c.overrides[kind], kind)
        if variant == "ppo_ptx":  # PPO-ptx is PPO plus its own overrides
            own += _overrides(c.overrides.ppo_ptx, "ppo_ptx")
        common = [] if kind == "ppo" else [("train.seed", str(c.seed))]  # PPO's seed is per run
        if kind != "pretrain":  # every stage after pretraining reads the same instance of the suite
            common.append(("data.suite_seed", str(c.suite_seed)))
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
    return Workdir(os.path.join(workdir, name)).summary()


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


def _measures(summary: dict, prefix: str = "") -> dict[str, float]:
    """A policy's held-out measures (POLICY_KEYS and per task) from a PPO summary, `prefix` stripped."""
    out = {}
    for key, value in summary.items():
        if not key.startswith(prefix) or not isinstance(value, (int, float)):
            continue
        name = key[len(prefix):]
        if name in POLICY_KEYS or name.split("/")[0] in PER_TASK and "/" in name:
            out[name] = float(value)
    return out


def _iterations(workdir: str, name: str) -> list[dict]:
    return [r for r in Workdir(os.path.join(workdir, name)).metrics() if "iteration" in r]


def _policy(workdir: str, names: list[str], summaries: dict) -> dict:
    """One PPO variant of one round over its seeds: the mean of each measure, the seeds' values, the margins over
    SFT (mean, std over seeds), and from the rollouts the share of groups with no reward spread."""
    runs = [summaries[n] for n in names]
    measures = [_measures(s) for s in runs]
    out = {k: float(np.mean([m[k] for m in measures])) for k in measures[0]}
    out["seeds"] = {k: [m[k] for m in measures] for k in POLICY_KEYS if k in measures[0]}
    for key in ("labeler_score", "exact_match", "sampled_labeler_score"):
        if key in measures[0] and f"sft_{key}" in runs[0]:
            out["margin_vs_sft" if key == "labeler_score" else f"{key}_margin_vs_sft"] = _mean_std(
                [m[key] - s[f"sft_{key}"] for m, s in zip(measures, runs)])
    spread = [r["zero_spread_groups"] for n in names for r in _iterations(workdir, n) if "zero_spread_groups" in r]
    if spread:
        out["zero_spread_groups"] = float(np.mean(spread))
    return out


def _sft_curve(workdir: str) -> list[dict]:
    """The SFT stage's held-out evaluations, in order: how far its training went toward its best."""
    return [{k: r[k] for k in ("step", "eval_loss", "labeler_score", "exact_match") if k in r}
            for r in Workdir(os.path.join(workdir, "sft")).metrics() if "eval_loss" in r]


def write_report(c: ml_collections.ConfigDict, workdir: str, steps: list[Step]) -> dict:
    """report.json (every stage's headline metrics; per policy its held-out measures, over seeds; the SFT curve),
    report.md and reward_kl.png (reward and KL to the reference per PPO iteration)."""
    summaries = {s.name: _summary(workdir, s.name) for s in steps}
    stages = {s.name: {k: summaries[s.name].get(k) for k in registry.get(s.kind).headline + ("wall_s",) if k in summaries[s.name]}
              for s in steps}
    variants = ["ppo"] + (["ppo_ptx"] if c.ptx else [])
    first = summaries["ppo"]
    policies = {"sft": {**_measures(first, "sft_"), "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0}}
    for r in range(1, c.rounds + 1):
        suffix = "" if r == 1 else str(r)
        for v in variants:
            names = [f"{v}{suffix}{'' if s == 0 else f'-seed{s}'}" for s in range(c.ppo_seeds)]
            policies[f"{v}{suffix}"] = _policy(workdir, names, summaries)
    report = {"workdir": workdir, "rounds": c.rounds, "ppo_seeds": c.ppo_seeds, "suite_seed": c.suite_seed,
              "stages": stages, "sft_curve": _sft_curve(workdir), "policies": policies,
              "wall_s": sum(v.get("wall_s", 0.0) for v in stages.values())}
    write_json(os.path.join(workdir, "report.json"), report)
    write_atomic(os.path.join(workdir, "report.md"), report_markdown(report).encode())
    _plot(workdir, [s.name for s in steps if s.kind == "ppo"])
    return report


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _margin(p: dict, key: str) -> str:
    m = p.get(key)
    return f"{m['mean']:+.4f} ± {m['std']:.4f}" if m else ""


def report_markdown(report: dict) -> str:
    lines = [f"# InstructGPT pipeline: {report['workdir']}", "",
             f"{report['rounds']} round(s), {report['ppo_seeds']} PPO seed(s), suite seed {report.get('suite_seed', 0)};"
             f" stages took {report['wall_s'] / 60:.1f} min in all.", "", "| stage | headline metrics | wall s |",
             "|---|---|---|"]
    for name, m in report["stages"].items():
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k != "wall_s")
        lines.append(f"| {name} | {metrics} | {m.get('wall_s', 0):.0f} |")
    curve = report.get("sft_curve", [])
    if curve:
        lines += ["", "SFT on held-out demonstrations (step: labeler score, exact match): " + "; ".join(
            f"{r['step']}: {_fmt(r.get('labeler_score'))}, {_fmt(r.get('exact_match'))}" for r in curve)]
    lines += ["", "Held-out prompts: greedy answers (labeler score, exact match), 8 samples at the rollout "
              "temperature (sampled score, pass@1, pass@8); mean over PPO seeds, margins over SFT ± their std. "
              "`SFT best-of-8` lets the reward model pick one of SFT's 8 samples.", "",
              "| policy | labeler score | margin vs SFT | exact match | exact margin | sampled score | sampled margin "
              "| pass@1 | pass@8 | win rate vs SFT | KL to SFT | groups without spread | RM agreement | "
              "pretraining perplexity |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in report["policies"].items():
        lines.append(f"| {name} | {_fmt(p.get('labeler_score'))} | {_margin(p, 'margin_vs_sft')} | "
                     f"{_fmt(p.get('exact_match'))} | {_margin(p, 'exact_match_margin_vs_sft')} | "
                     f"{_fmt(p.get('sampled_labeler_score'))} | {_margin(p, 'sampled_labeler_score_margin_vs_sft')} | "
                     f"{_fmt(p.get('pass@1'))} | {_fmt(p.get('pass@8'))} | {_fmt(p.get('win_rate_vs_sft'))} | "
                     f"{_fmt(p.get('kl_to_sft'))} | {_fmt(p.get('zero_spread_groups', ''))} | "
                     f"{_fmt(p.get('rm_agreement'))} | {_fmt(p.get('pretrain_perplexity'))} |")
    sft = report["policies"]["sft"]
    if "best_of_8" in sft:
        lines.append(f"| SFT best-of-8 | {_fmt(sft['best_of_8'])} | {sft['best_of_8'] - sft['labeler_score']:+.4f} |"
                     + " |" * 12)
    tasks = sorted({k.split("/")[1] for k in sft if "/" in k})
    if tasks:
        lines += ["", "Per task, pass@1 / pass@8 (exact answers among 8 samples) and greedy exact match:", "",
                  "| policy | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for name, p in report["policies"].items():
            cells = [f"{_fmt(p.get(f'pass@1/{t}'))} / {_fmt(p.get(f'pass@8/{t}'))} ({_fmt(p.get(f'exact_match/{t}'))})"
                     for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(workdir: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [r for r in _iterations(workdir, name) if "reward" in r]
        iterations = [r["iteration"] for r in rows]
        reward_ax.plot(iterations, [r["reward"] for r in rows], label=name)
        kl_ax.plot(iterations, [r["kl"] for r in rows], label=name)
    reward_ax.set(xlabel="PPO iteration", ylabel="mean reward-model score of the rollouts", title="reward")
    kl_ax.set(xlabel="PPO iteration", ylabel="KL to the SFT policy (nats per response)", title="KL")
    reward_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "reward_kl.png"), dpi=100)
    plt.close(fig)
