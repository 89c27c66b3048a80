"""InstructGPT's whole pipeline on the tiny model and the offline instruction suite, as one command:

    python -m omni.main --config=experiments/instructgpt.py [--workdir=runs/instructgpt]

pretrain -> SFT -> ranked SFT samples -> reward model -> PPO and PPO-ptx, each stage a workdir under the
pipeline's, then report.json / report.md / reward_kl.png there (omni/pipeline.py). Rerunning skips finished
stages. Keys:
    rounds      repeat (rank the latest policy's samples -> reward model -> PPO) this many times
    ppo_seeds   PPO (and PPO-ptx) seeds per round, on the same reward model: the report gives their spread
    seed        train.seed of every stage (PPO seed s adds s)
    suite_seed  which instance of the offline suite (data.suite_seed of every stage after pretraining)
    pretrained  an existing pretraining workdir (e.g. runs/tiny): skip the pretrain stage
    ptx, ptx_coef   also run PPO-ptx with this pretraining-loss coefficient
    configs.K   the config file of stage K; overrides.K: "KEY=VALUE ..." passed to stage K as --config.KEY=VALUE
                (K in pretrain, sft, label, rm, ppo, ppo_ptx)
    dry_run     print the stage commands, run nothing
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.name = "instructgpt"
    c.rounds = 1
    c.ppo_seeds = 1
    c.seed = 0
    c.suite_seed = 0
    c.pretrained = ""
    c.ptx = True
    c.ptx_coef = 1.0
    c.dry_run = False
    c.configs = ml_collections.ConfigDict(dict(
        pretrain="configs/tiny.py", sft="configs/sft_tiny.py", label="configs/label_tiny.py",
        rm="configs/rm_tiny.py", ppo="configs/ppo_tiny.py"))
    # The reward model sees the suite's rankings and those of SFT samples (about 4,100 prompts: 200 steps of 16 are
    # one epoch), and responses fit 48 tokens.
    c.overrides = ml_collections.ConfigDict(dict(pretrain="", sft="", label="", rm="train.steps=200 train.seq_len=48",
                                                 ppo="", ppo_ptx=""))
    return c
