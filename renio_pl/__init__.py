"""renio-pl: on-policy distillation of LLMs with pluggable rollout weighting (ReNIO).

Data flow, one module per stage: prompts -> rollouts -> logprobs -> weighters -> losses,
wired by `module.DistillationModule` and `datamodule.OnPolicyDataModule`.
"""

__version__ = "0.1.0"
