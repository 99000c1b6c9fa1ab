"""renio-pl: on-policy distillation of LLMs with pluggable rollout weighting (ReNIO).

Data flow, one module per stage: prompts -> rollouts -> logprobs -> weighters -> losses,
wired by `module.DistillationModule` and `datamodule.OnPolicyDataModule`.

Glossary: the letters every shape in the package's docstrings and `# (B, T)` comments uses.

- `P` prompts (problems) of a rollout round or a sampling call.
- `G` samples per prompt (`sampling.n`; in evaluation, the k of Avg@k).
- `B` rollouts in a batch (`B = P * G` for a whole round); in the offline data
  (`renio_pl.offline`) a record: one trace, a prompt with its positive (and negative).
- `R` rows of a forward or generate call that are not one per rollout: the offline
  batch's `B` positives then its `B` negatives; the sequences being sampled.
- `T` completion tokens, padded to the batch's longest completion.
- `T_prompt` the padded prompt width (`T_teacher_prompt` for the teacher's own prompts);
  `L = T_prompt + T` the whole sequence (prompts left-padded, completions right-padded).
- `N` completion tokens packed together (those under `completion_mask`); `C` a chunk of
  them, at most `chunk_tokens`, the unit that logits are made for.
- `V` vocabulary; `k` the teacher's top-k width (`top_k`); `H` hidden size (`H_S` the
  student's, `H_T` the teacher's).
- `M` reasoning markers counted by the diagnostics.

Ragged lists carry the letters as a suffix: `completions_P_G` holds `P` lists of `G`
completions.
"""

__version__ = "0.1.0"
