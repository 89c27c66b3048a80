"""The held-out evaluation every post-training stage reports (PPO, GRPO, RLOO, DPO, best-of-n): the policy against
the reference (SFT) policy on the suite's held-out prompts, greedy and sampled, with the same compiled programs as
the rollouts (omni/stages/rollout.py) and the measures of omni/stages/heldout.py. The reference's own numbers are
computed once and kept in its workdir.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
import numpy as np

from omni import generate, parallel
from omni.data import instructions
from omni.data.template import prompt_ids
from omni.generate import Generator
from omni.models import gpt
from omni.stages import heldout, rollout
from omni.stages.rollout import (Rollouts, fitting_prompts, frozen_params, labeler_of, pretraining, response_text,
                                 sample, score_rows, summed_log_ratio)
from omni.workdir import Workdir, fingerprint


def policy_evaluation(config: ml_collections.ConfigDict, tokenizer, mesh, ref_params, reference_dir: str
                      ) -> Callable[[Any, dict], dict]:
    """eval_extra for a stage that trains a bare policy (DPO, best-of-n): HeldOut's measures against the reference
    policy `ref_params` (from workdir `reference_dir`), with the reward model of ppo.reward_from where one is given, so that every post-training
    method is judged on the same prompts by the same measures as PPO."""
    p = config.ppo
    rm = frozen_params(config, p.reward_from, "scalar", "ppo.reward_from", mesh) if p.reward_from else None
    labeler, task_of = labeler_of(config)
    _, lm_eval = pretraining(config, tokenizer, mesh)
    generator = Generator(config.model, ref_params, mesh, pad_id=tokenizer.pad_id)
    judge = Rollouts(config, tokenizer, [], generator, (ref_params, rm),
                     parallel.process_rows(mesh, config.train.batch_size), labeler=labeler)
    held = HeldOut(judge, fitting_prompts(config, tokenizer, "validation")[:p.eval_prompts], lm_eval, task_of,
                   reference_dir)
    return lambda params, evals: held({"policy": params}, evals)


class HeldOut:
    """eval_extra for the trainer: the policy against the reference (SFT) policy on held-out prompts, by
    omni/stages/heldout.py's measures. Greedy answers give `labeler_score`, `exact_match` and `win_rate_vs_sft`
    (ties count half); ppo.eval_samples samples per prompt at the rollout temperature give
    `sampled_labeler_score`, `pass@1`, `pass@k` (per task too, as `pass@1/<task>`), `kl_to_sft` (mean summed
    log-ratio of the policy's samples: its KL from the reference), `eval_reward` (reward-model score) and
    `best_of_k` (the labeler's score of the sample the reward model prefers), `rm_agreement` (the share of
    pairs of samples the labeler separates that the reward model orders the same way). The reference's own
    numbers (`sft_*`) are computed once and kept in the reference's workdir, since every run judged against it on
    the same prompts by the same settings gets the same ones (three seeds of five methods: one computation); its
    `sft_best_of_k` is the baseline RL should approach."""

    def __init__(self, rollouts: Rollouts, prompts: list[str], lm_eval: Callable | None = None,
                 task_of: Callable[[str], str] | None = None, reference_dir: str = ""):
        self.r, self.prompts, self.lm_eval = rollouts, prompts, lm_eval  # lm_eval: policy params -> perplexity
        self.task_of = task_of
        self.reference_dir = reference_dir  # the reference's workdir, where its measures are kept (cache/)
        self.ids = [prompt_ids(rollouts.tokenizer, t) for t in prompts]
        self.sft: dict | None = None

    def __call__(self, params, evals: dict) -> dict[str, float]:
        del evals
        if self.sft is None:  # the reference policy's own numbers, once
            self.sft = self._reference(params)
        policy = self._measure(params["policy"], params)
        out = {k: v for k, v in policy.items() if k not in ("greedy", "greedy_scores")}
        out.update({f"sft_{k}": v for k, v in self.sft.items() if k not in ("greedy", "greedy_scores", "kl_to_sft")})
        out["changed_vs_sft"] = float(np.mean([a != b for a, b in zip(policy["greedy"], self.sft["greedy"])]))
        out["heldout_prompts"] = len(self.prompts)  # those that fit train.seq_len: compare methods on equal sets
        if "greedy_scores" in policy:
            mine, sft = policy["greedy_scores"], self.sft["greedy_scores"]
            out["win_rate_vs_sft"] = float(np.mean((mine > sft) + 0.5 * (mine == sft)))
        if self.lm_eval is not None:
            out["pretrain_perplexity"] = self.lm_eval(params["policy"])
        return out

    def _reference(self, params) -> dict:
        """The reference policy's measures, and its pretraining perplexity where PPO-ptx evaluates one: read from
        the reference's workdir where a run with the same fingerprint (`_reference_settings`) computed them."""
        def measure() -> dict:
            sft = self._measure(self.r.ref_params, params)
            del sft["kl_to_sft"]  # the policy's log-ratio on the reference's samples: not the reference's own
            if self.lm_eval is not None:
                sft["pretrain_perplexity"] = self.lm_eval(self.r.ref_params)
            return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sft.items()}

        if self.reference_dir:
            key = fingerprint(self._reference_settings(), self.r.ref_params, self.r.rm_params)
            sft = Workdir(self.reference_dir).cached(f"heldout-{key}.json", measure)
        else:
            sft = measure()
        return {**sft, "greedy_scores": np.asarray(sft["greedy_scores"])} if "greedy_scores" in sft else sft

    def _reference_settings(self) -> dict:
        """All the reference's measures depend on besides its params and the reward model's: the prompts, the
        sampling, the pretraining evaluation, the devices, and the code and tokenizer that compute them."""
        c, p = self.r.config, self.r.p
        return {"prompts": self.prompts, "model": c.model.to_dict(), "data": c.data.to_dict(),
                "seq_len": c.train.seq_len, "mesh": c.mesh.to_dict(), "cpu_devices": c.cpu_devices,
                "ppo": {k: p[k] for k in ("max_new_tokens", "temperature", "rollout_batch", "eval_samples",
                                          "ptx_data", "ptx_path", "ptx_batch", "ptx_eval_rows")},
                "labeler": self.r.labeler is not None, "tasks": self.task_of is not None,
                "perplexity": self.lm_eval is not None,
                "files": [__file__, rollout.__file__, heldout.__file__, generate.__file__, instructions.__file__, gpt.__file__,
                          self.r.tokenizer.model_path]}

    def _measure(self, policy_params, params) -> dict:
        """The held-out measures of one policy; `greedy` and `greedy_scores` kept for the comparison."""
        k = self.r.p.eval_samples
        greedy, _, _ = self._generate(policy_params, params, self.ids, 0.0, scored=False)
        texts, kls, rewards = self._generate(policy_params, params, self.ids, self.r.p.temperature, group=k)
        out = {"greedy": greedy, "kl_to_sft": float(kls.mean())}
        if self.r.rm_params is not None:
            out["eval_reward"] = float(rewards.mean())
        if self.r.labeler is not None:
            out.update(self._labeler_measures(greedy, texts, rewards.reshape(-1, k)))
        return out

    def _labeler_measures(self, greedy: list[str], texts: list[str], rewards: np.ndarray) -> dict:
        """heldout.quality's measures (per task too) of the greedy answers and the samples `texts` (k per
        prompt, reward-model scores `rewards` [prompts, k]), `greedy_scores`, best-of-k and `rm_agreement`."""
        k = rewards.shape[1]
        sampled = [texts[j * k:(j + 1) * k] for j in range(len(self.prompts))]
        greedy_scores, sample_scores = heldout.scores(self.prompts, greedy, sampled, self.r.labeler)
        tasks = [self.task_of(p) for p in self.prompts] if self.task_of is not None else None
        q = heldout.quality(greedy_scores, sample_scores, tasks)
        out = {}
        for task, measures in q.pop("by_task", {}).items():
            out.update({f"{name}/{task}": v for name, v in measures.items() if name != "prompts"})
        del q["prompts"]
        out.update(q, greedy_scores=greedy_scores)
        if self.r.rm_params is not None:
            out[f"best_of_{k}"] = heldout.best_of(sample_scores, rewards)
            out["rm_agreement"] = heldout.agreement(sample_scores, rewards)
        return out

    def _generate(self, policy_params, params, ids: list[list[int]], temperature: float, scored: bool = True,
                  group: int = 1):
        """(texts, summed log-ratio to the reference, reward-model scores; both empty unless `scored`) of `group`
        responses to each of `ids`, in chunks of the rollout batch (the compiled programs serve); a last chunk of
        fewer prompts is padded only to the next power of two."""
        per, texts, kls, rewards = max(self.r.p.rollout_batch // group, 1), [], [], []
        for start in range(0, len(ids), per):
            chunk = ids[start:start + per]
            real = len(chunk) * group
            rows, out = sample(self.r.generator, self.r.tokenizer, self.r.config, policy_params,
                               chunk + [chunk[0]] * (self._prompts(len(chunk), group) - len(chunk)),
                               12345 + start * group, temperature, group)
            texts += [response_text(self.r.tokenizer, out, i) for i in range(real)]
            if scored:
                logp, ref_logp, _, scores = score_rows(self.r.score, params, self.r.ref_params, self.r.rm_params,
                                                       rows)
                kls += summed_log_ratio(logp, ref_logp, rows["mask"])[:real].tolist()
                rewards += scores[:real].tolist()
        return texts, np.array(kls), np.array(rewards)

    def _prompts(self, real: int, group: int) -> int:
        """The prompts a chunk of `real` prompts (`group` samples each) is padded to: a full chunk, or for fewer the
        next power of two where the mesh's devices divide its rows (one more compiled shape, not a batch of
        padding; the samples are the same, since each row's random draws depend only on its index)."""
        mesh = self.r.generator.mesh
        full, devices = max(self.r.p.rollout_batch // group, 1), 1 if mesh is None else mesh.devices.size
        prompts = 1 << max(real - 1, 0).bit_length()
        return prompts if prompts < full and prompts * group % devices == 0 else full
