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
every stage's headline metrics and the policies side by side on held-out prompts. The stages share one
persistent compilation cache, W/xla_cache.

    python -m omni.main --config=experiments/post_training.py [--config.methods=dpo,grpo] [--config.seeds=3]

runs the same pretrain -> sft -> label -> rm, then each post-training method (METHODS) and seed from W/sft and
W/rm in W/<method>-seed<s>, and writes W/post_training.json and W/post_training.md: the methods against SFT,
with margins in standard deviations over seeds.
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


def _check_configs(c: ml_collections.ConfigDict, keys) -> None:
    for key in keys:
        if not os.path.isfile(c.configs[key]):
            raise ConfigError(f"config.configs.{key}={c.configs[key]!r}: no such config file")
    if not isinstance(c.suite_seed, int) or c.suite_seed < 0:
        raise ConfigError(f"config.suite_seed={c.suite_seed!r}: must be an int >= 0")


def _step(c: ml_collections.ConfigDict, name: str, kind: str, extra: list, keys: tuple[str, ...] = (),
          config: str = "") -> Step:
    """Stage `kind` in W/name from config file c.configs[config or keys[0]] (default: kind) with, in order,
    train.seed = c.seed (unless `extra` sets it), data.suite_seed (after pretraining), `extra` and the overrides of
    each of `keys`."""
    keys = keys or (kind,)
    own = [pair for key in keys for pair in _overrides(c.overrides[key], key)]
    common = [] if any(k == "train.seed" for k, _ in extra) else [("train.seed", str(c.seed))]
    if kind != "pretrain":  # every stage after pretraining reads the same instance of the suite
        common.append(("data.suite_seed", str(c.suite_seed)))
    return Step(name, kind, c.configs[config or keys[0]], tuple(common + extra + own))


def _sft(c: ml_collections.ConfigDict, path) -> list[Step]:
    """pretrain (unless c.pretrained names one) -> sft."""
    pretrained = c.pretrained or path("pretrain")
    return ([] if c.pretrained else [_step(c, "pretrain", "pretrain", [])]) + [
        _step(c, "sft", "sft", [("init_from", pretrained)])]


def _label_rm(c: ml_collections.ConfigDict, path, suffix: str, policy: str, rm_init: str) -> list[Step]:
    """label<suffix> (rank `policy`'s samples) -> rm<suffix> (from `rm_init`, on those rankings)."""
    return [_step(c, f"label{suffix}", "label", [("init_from", policy)]),
            _step(c, f"rm{suffix}", "rm", [("init_from", rm_init), ("data.name", "jsonl"),
                                           ("data.path", path(f"label{suffix}/train")),
                                           ("data.eval_path", path(f"label{suffix}/eval"))])]


def plan(c: ml_collections.ConfigDict, workdir: str) -> list[Step]:
    """The pipeline's steps in order."""
    if not isinstance(c.rounds, int) or c.rounds < 1:
        raise ConfigError(f"config.rounds={c.rounds!r}: must be a positive int")
    if not isinstance(c.ppo_seeds, int) or c.ppo_seeds < 1:
        raise ConfigError(f"config.ppo_seeds={c.ppo_seeds!r}: must be a positive int")
    _check_configs(c, ("pretrain", "sft", "label", "rm", "ppo"))
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    steps = _sft(c, path)
    variants = [("ppo", [])] + ([("ppo_ptx", [("ppo.ptx_coef", str(c.ptx_coef))])] if c.ptx else [])
    for r in range(1, c.rounds + 1):
        suffix, previous = ("" if r == 1 else str(r)), ("" if r <= 2 else str(r - 1))
        policy = path("sft") if r == 1 else path(f"ppo{previous}")
        steps += _label_rm(c, path, suffix, policy, path("sft") if r == 1 else path(f"rm{previous}"))
        for variant, extra in variants:
            for s in range(c.ppo_seeds):
                tag = "" if s == 0 else f"-seed{s}"
                start = path("sft") if r == 1 else path(f"{variant}{previous}{tag}")
                # PPO-ptx is PPO plus its own overrides
                steps.append(_step(c, f"{variant}{suffix}{tag}", "ppo",
                                   [("init_from", start), ("ppo.reward_from", path(f"rm{suffix}")),
                                    ("ppo.reference_from", path("sft")), ("train.seed", str(c.seed + s))] + extra,
                                   ("ppo",) if variant == "ppo" else ("ppo", "ppo_ptx")))
    return steps


# experiments/post_training.py's methods: name -> stage. Each starts from W/sft (also the reference of the KL and of
# the held-out measures) and is judged with the reward model W/rm; grpo_verifier is GRPO on the labeler's reward.
METHODS = {"best_of_n": "best_of_n", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo", "grpo_verifier": "grpo"}


def methods(c: ml_collections.ConfigDict) -> list[str]:
    """config.methods (a comma-separated string, or a tuple), checked against METHODS."""
    names = c.methods.split(",") if isinstance(c.methods, str) else list(c.methods)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown or len(set(names)) < len(names):
        why = f"unknown method {unknown[0]!r}" if unknown else "no method named" if not names else "a method twice"
        raise ConfigError(f"config.methods={c.methods!r}: {why}; expected some of {', '.join(METHODS)} "
                          "(comma-separated)")
    return names


def post_training_plan(c: ml_collections.ConfigDict, workdir: str) -> list[Step]:
    """pretrain -> sft -> label -> rm as experiments/instructgpt.py's round 1, then each method x seed in
    W/<method>-seed<s> (s from 0, train.seed = seed + s)."""
    if not isinstance(c.seeds, int) or c.seeds < 1:
        raise ConfigError(f"config.seeds={c.seeds!r}: must be a positive int")
    names = methods(c)
    _check_configs(c, ["sft", "label", "rm"] + ([] if c.pretrained else ["pretrain"]) + names)
    path = lambda name: os.path.join(workdir, name)  # noqa: E731
    sft = path("sft")
    steps = _sft(c, path) + _label_rm(c, path, "", sft, sft)
    for m in names:
        kind = METHODS[m]
        extra = [("init_from", sft), ("ppo.reward_from", path("rm"))]
        if kind == "dpo":
            extra += [("dpo.reference_from", sft), ("dpo.path", path("label/train")),
                      ("dpo.eval_path", path("label/eval"))]
        elif kind in ("ppo", "grpo"):
            extra.append(("ppo.reference_from", sft))  # best-of-n's reference is its init_from
        if m == "grpo_verifier":
            extra.append(("grpo.reward", "labeler"))
        steps += [_step(c, f"{m}-seed{s}", kind, extra + [("train.seed", str(c.seed + s))], ("every_method", m), m)
                  for s in range(c.seeds)]
    return steps


def command(step: Step, workdir: str) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in step.overrides]
    return [sys.executable, "-m", "omni.main", f"--config={step.config}", *flags,
            f"--workdir={os.path.join(workdir, step.name)}"]


def compilation_cache_env(workdir: str) -> dict[str, str]:
    """The stages' environment: one persistent JAX compilation cache in W/xla_cache (unless the caller set one),
    so that the seeds of a method, and the programs every method shares (generation, the held-out measures),
    compile once per pipeline rather than once per process. A cached program is keyed by its HLO, the compile
    options and the JAX version, so a changed code base compiles afresh."""
    env = dict(os.environ)
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(os.path.join(workdir, "xla_cache"))
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _summary(workdir: str, name: str) -> dict | None:
    return Workdir(os.path.join(workdir, name)).summary()


def run(c: ml_collections.ConfigDict, workdir: str) -> int:
    """Runs the pipeline of config.stage ('pipeline': experiments/instructgpt.py, 'post_training':
    experiments/post_training.py) step by step, skipping finished steps, then writes and prints its report."""
    post = c.stage == "post_training"
    steps = (post_training_plan if post else plan)(c, workdir)
    if c.dry_run:
        print("\n".join(shlex.join(command(s, workdir)) for s in steps), flush=True)
        return 0
    os.makedirs(workdir, exist_ok=True)
    env = compilation_cache_env(workdir)
    for i, step in enumerate(steps, 1):
        if _summary(workdir, step.name) is not None:
            print(f"[pipeline] {i}/{len(steps)} {step.name}: done, skipped", flush=True)
            continue
        cmd = command(step, workdir)
        print(f"[pipeline] {i}/{len(steps)} {step.name}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0 or _summary(workdir, step.name) is None:  # a preempted stage exits 0 without a summary
            print(f"[pipeline] {step.name} did not finish (exit code {rc}); finished steps are kept: rerun the same "
                  "command to go on from there", file=sys.stderr, flush=True)
            return rc or 1
    report = (write_post_training_report if post else write_report)(c, workdir, steps)
    print((post_training_markdown if post else report_markdown)(report), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Report

def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": _std(values), "seeds": values}


def _std(values: list[float]) -> float:
    """The sample standard deviation over seeds (ddof 1, the unbiased variance's root); 0 for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


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


def _stages(steps: list[Step], summaries: dict) -> dict:
    """Each step's headline metrics (its stage's) and wall_s."""
    return {s.name: {k: summaries[s.name][k] for k in registry.get(s.kind).headline + ("wall_s",)
                     if k in summaries[s.name]} for s in steps}


def write_report(c: ml_collections.ConfigDict, workdir: str, steps: list[Step]) -> dict:
    """report.json (every stage's headline metrics; per policy its held-out measures, over seeds; the SFT curve),
    report.md and reward_kl.png (reward and KL to the reference per PPO iteration)."""
    summaries = {s.name: _summary(workdir, s.name) for s in steps}
    stages = _stages(steps, summaries)
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


# ---------------------------------------------------------------------------------------------------------
# Post-training comparison (experiments/post_training.py)

# Margins over SFT in post_training.json: measure -> {mean, std, seeds, n_std}; the table shows the first two.
MARGINS = ("labeler_score", "sampled_labeler_score", "exact_match")


def _episodes(workdir: str, name: str, kind: str, summary: dict) -> int:
    """Samples a run drew from its policy: RL's rollouts, best-of-n's n per prompt, none for DPO."""
    if kind == "best_of_n":
        return Workdir(os.path.join(workdir, name)).saved_config()["best_of_n"]["n"] * summary["kept_answers"]
    return int(summary.get("episodes", 0))


def _sft_row(runs: dict[str, dict]) -> tuple[dict, dict]:
    """The SFT reference's measures (the sft_* keys of every run's summary: the same model, prompts and sampling
    seeds, so the same numbers) and, per measure whose runs disagree, their max - min."""
    measures = {name: _measures(s, "sft_") for name, s in runs.items()}
    first = next(iter(measures.values()))
    spread = {}
    for key in first:
        values = [m[key] for m in measures.values() if key in m]
        if max(values) - min(values) > 1e-6:
            spread[key] = max(values) - min(values)
    if spread:
        print(f"[post_training] warning: the runs' SFT reference measures differ (max - min: "
              f"{', '.join(f'{k} {v:.4g}' for k, v in spread.items())}); each margin is over its own run's",
              file=sys.stderr, flush=True)
    row = {k: {"mean": v, "std": 0.0} for k, v in first.items()}
    row.update(win_rate_vs_sft={"mean": 0.5, "std": 0.0}, kl_to_sft={"mean": 0.0, "std": 0.0})
    return row, spread


def write_post_training_report(c: ml_collections.ConfigDict, workdir: str, steps: list[Step]) -> dict:
    """post_training.json and post_training.md: per method, each held-out measure's mean and std over seeds (and
    the seeds' values), the margins over SFT (each seed's against its own run's SFT numbers) with their std and
    mean / std, episodes per run, wall time over its seeds; an SFT row; the wall time of the whole comparison."""
    summaries = {s.name: _summary(workdir, s.name) for s in steps}
    kinds = {s.name: s.kind for s in steps}
    names = methods(c)
    runs = {m: [f"{m}-seed{s}" for s in range(c.seeds)] for m in names}
    sft, sft_spread = _sft_row({n: summaries[n] for m in names for n in runs[m]})
    sft["wall_s"] = summaries["sft"].get("wall_s", 0.0)
    policies = {"sft": sft}
    for m in names:
        p = _policy(workdir, runs[m], summaries)
        row = {k: {"mean": p[k], "std": _std(v), "seeds": v} for k, v in p.pop("seeds").items()}
        for key in MARGINS:
            margin = p.get("margin_vs_sft" if key == "labeler_score" else f"{key}_margin_vs_sft")
            if margin:
                spread = margin["std"] > 1e-9  # not rounding noise of equal margins
                row[f"{key}_margin"] = {**margin, "n_std": margin["mean"] / margin["std"] if spread else None}
        episodes = [_episodes(workdir, n, kinds[n], summaries[n]) for n in runs[m]]
        row.update(stage=kinds[runs[m][0]], episodes=int(np.mean(episodes)),
                   wall_s=sum(summaries[n].get("wall_s", 0.0) for n in runs[m]))
        if "zero_spread_groups" in p:
            row["zero_spread_groups"] = p["zero_spread_groups"]
        if "ranked_prompts" in summaries[runs[m][0]]:
            row["ranked_prompts"] = summaries[runs[m][0]]["ranked_prompts"]
        policies[m] = row
    stages = _stages(steps, summaries)
    method_steps = [n for m in names for n in runs[m]]
    report = {"workdir": workdir, "methods": names, "seeds": c.seeds, "seed": c.seed, "suite_seed": c.suite_seed,
              "pretrained": c.pretrained or os.path.join(workdir, "pretrain"), "stages": stages,
              "policies": policies, "sft_spread": sft_spread,
              "heldout_prompts": sorted({summaries[n].get("heldout_prompts") for n in method_steps} - {None}),
              "wall_s": sum(v.get("wall_s", 0.0) for v in stages.values()),
              "methods_wall_s": sum(stages[n].get("wall_s", 0.0) for n in method_steps)}
    write_json(os.path.join(workdir, "post_training.json"), report)
    write_atomic(os.path.join(workdir, "post_training.md"), post_training_markdown(report).encode())
    return report


def _pm(d: dict | None, fmt: str = ".4f") -> str:
    """mean ± std."""
    return "" if not d else f"{d['mean']:{fmt}} ± {d['std']:{fmt.lstrip('+')}}"


def _n_std(d: dict | None) -> str:
    """margin / std; ∞ for a margin without spread over seeds."""
    if not d:
        return ""
    return f"{d['n_std']:.1f}" if d.get("n_std") is not None else "∞" if abs(d["mean"]) > 1e-9 else "-"


def post_training_markdown(report: dict) -> str:
    stages = report["stages"]
    shared = ", ".join(f"{name} {stages[name].get('wall_s', 0) / 60:.1f}" for name in ("pretrain", "sft", "label", "rm")
                       if name in stages)
    rm = stages.get("rm", {}).get("heldout_pairwise_accuracy")
    lines = [f"# Post-training methods from one SFT model: {report['workdir']}", "",
             f"{len(report['methods'])} method(s) x {report['seeds']} seed(s) (train.seed {report['seed']}.."
             f"{report['seed'] + report['seeds'] - 1}), suite seed {report['suite_seed']}, from one SFT model (of "
             f"{report['pretrained']}) and one reward model"
             + (f" (held-out pairwise accuracy {rm:.3f})" if rm is not None else "") + ".",
             f"Wall time: {report['wall_s'] / 60:.1f} min in all (shared stages, min: {shared}); the methods alone "
             f"{report['methods_wall_s'] / 60:.1f} min.", "",
             f"Held-out prompts ({' / '.join(map(str, report.get('heldout_prompts', []))) or '?'}; the same for "
             "every method): greedy answers (labeler score, exact match), samples at the rollout temperature "
             "(sampled score). Mean ± std over seeds (sample std, ddof 1); margins over SFT ± their std, and "
             "margin / std (how many standard deviations over seeds a method is above SFT; ∞: no spread). "
             "Episodes: samples a run drew (RL rollouts, best-of-n's n per prompt; DPO draws none and trains on "
             "ranked prompts). Wall: all seeds of a method.", "",
             "| method | greedy labeler score | margin vs SFT | margin / std | sampled labeler score | sampled margin "
             "| margin / std | exact match | win rate vs SFT | KL to SFT | pretraining perplexity | episodes per run "
             "| wall min |", "|---" * 13 + "|"]
    for name, p in report["policies"].items():
        if name == "sft":
            episodes = "-"
        elif "ranked_prompts" in p and not p["episodes"]:
            episodes = f"0 ({p['ranked_prompts']:,} ranked prompts)"
        else:
            episodes = f"{p['episodes']:,}"
        lines.append(
            f"| {'SFT' if name == 'sft' else name} | {_pm(p.get('labeler_score'))} | "
            f"{_pm(p.get('labeler_score_margin'), '+.4f')} | {_n_std(p.get('labeler_score_margin'))} | "
            f"{_pm(p.get('sampled_labeler_score'))} | {_pm(p.get('sampled_labeler_score_margin'), '+.4f')} | "
            f"{_n_std(p.get('sampled_labeler_score_margin'))} | {_pm(p.get('exact_match'))} | "
            f"{_pm(p.get('win_rate_vs_sft'))} | {_pm(p.get('kl_to_sft'))} | "
            f"{_pm(p.get('pretrain_perplexity'), '.4g')} | {episodes} | "
            f"{p.get('wall_s', 0) / 60:.1f} |")
    if report.get("sft_spread"):
        lines += ["", "Warning: the runs' SFT reference measures differ (max - min: " + ", ".join(
            f"{k} {v:.4g}" for k, v in report["sft_spread"].items()) + "); the SFT row is the first run's, and each "
            "margin is over its own run's SFT numbers."]
    return "\n".join(lines) + "\n"
