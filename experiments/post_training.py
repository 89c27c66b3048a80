"""Post-training methods side by side, as one command: from one SFT model and one reward model, best-of-n, DPO,
PPO, GRPO on the reward model and GRPO on the labeler's verifiable reward, each over `seeds` seeds:

    python -m omni.main --config=experiments/post_training.py [--workdir=runs/post_training]
                        [--config.pretrained=runs/tiny] [--config.seeds=3] [--config.methods=dpo,grpo]

pretrain -> SFT -> ranked SFT samples -> reward model as in experiments/instructgpt.py (the same step names and
defaults, so a pipeline's workdir can be reused: its finished stages are skipped), then for each method m and
seed s a stage in W/<m>-seed<s> from W/sft (reference W/sft, reward model W/rm, DPO on W/label's rankings,
train.seed = seed + s). Then W/post_training.json and W/post_training.md: per method its held-out greedy and
sampled labeler score (mean ± std over seeds), the margin over SFT ± std and its number of standard deviations,
exact match, win rate and KL to SFT, pretraining perplexity, episodes and wall time (omni/pipeline.py). Keys:
    methods     which to run, comma-separated: best_of_n, dpo, ppo, grpo, grpo_verifier (grpo.reward=labeler)
    seeds       seeds per method, on the same SFT and reward model
    seed        train.seed of every stage (a method's seed s adds s)
    suite_seed  which instance of the offline suite (data.suite_seed of every stage after pretraining)
    pretrained  an existing pretraining workdir (e.g. runs/tiny): skip the pretrain stage
    configs.K   the config file of stage or method K; overrides.K: "KEY=VALUE ..." passed to it as --config.KEY=VALUE
                (K in pretrain, sft, label, rm and the methods; overrides.every_method goes to every method,
                before its own: e.g. "cpu_devices=2")
    dry_run     print the stage commands, run nothing
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "post_training"
    c.name = "post_training"
    c.methods = "dpo,grpo,grpo_verifier,ppo,best_of_n"
    c.seeds = 3
    c.seed = 0
    c.suite_seed = 0
    c.pretrained = ""
    c.dry_run = False
    c.configs = ml_collections.ConfigDict(dict(
        pretrain="configs/tiny.py", sft="configs/sft_tiny.py", label="configs/label_tiny.py",
        rm="configs/rm_tiny.py", best_of_n="configs/best_of_n_tiny.py", dpo="configs/dpo_tiny.py",
        ppo="configs/ppo_tiny.py", grpo="configs/grpo_tiny.py", grpo_verifier="configs/grpo_tiny.py"))
    # SFT as experiments/instructgpt.py's, so either command reuses the other's. Every method is evaluated once, at
    # its end, on all the suite's held-out prompts (197 fit).
    judge = "ppo.eval_prompts=200"
    # SFT samples of 8,000 training prompts ranked (experiments/instructgpt.py ranks 1,500); the reward model for one
    # epoch of the 8,878 ranked prompts, as InstructGPT's (555 steps of 16); DPO for about one epoch of them too
    # (dev set, suite 1: 600 steps of about 16 prompts gained over 200; benchmarks/RESULTS.md). GRPO on the verifier for 24 iterations (12,288 episodes; dev set: both seeds gained
    # from iteration 16 to 24, greedy and sampled).
    c.overrides = ml_collections.ConfigDict(dict(
        pretrain="", sft="", label="label.prompts=8000", rm="train.steps=555 train.seq_len=48", every_method="",
        best_of_n=judge, dpo=judge + " train.steps=600 train.eval_every=600 train.checkpoint_every=300",
        ppo=judge + " train.eval_every=64", grpo=judge, grpo_verifier=judge + " ppo.iterations=24 train.eval_every=96"))
    return c
