"""Grading and scoring of sampled completions: the evaluation end of the data flow.

- `verifier`: the one grading protocol, `BatchVerifier` -> one `Verdict` per completion.
- `math`: final-answer extraction and math-verify checks (`is_correct`), as `MathVerifier`.
- `code`: HumanEval+ / MBPP+ with EvalPlus 0.3.1's semantics (`evaluate_solutions`), as
  `CodeVerifier`; its parts are `code_problems` (the tasks), `code_expected` (the cached
  expected outputs), `code_runs` (a stage run in the sandbox) and `code_oracles` (the comparison).
- `sandbox` runs untrusted programs (`sandbox_process` spawns the `sandbox_launcher` script and
  drains its pipes), and `harness` is the script that runs one program's tests inside it.
- `metrics` and `accuracy`: Avg@k, maj@k and pass@k as torchmetrics, fed graded rollouts.
"""
