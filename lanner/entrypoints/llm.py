"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``, as in vLLM."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lanner.engine.llm_engine import LLMEngine, PromptType
from lanner.engine.outputs import RequestOutput
from lanner.metrics.reader import EngineMetrics, Metric, check_prefix
from lanner.model.tokenizer import conversation_from_messages, render_chat_template
from lanner.model.tokenizer_cache import transformers_tokenizer
from lanner.sampling_params import SamplingParams, check_unicode

# Batches at least this large show a progress bar when use_tqdm is left at its default.
_PROGRESS_MIN_PROMPTS = 8


def progress_bar(total: int) -> Any:
    """tqdm's bar over ``total`` requests (imported here: tqdm.auto costs ~0.2 s, which
    a run without a bar need not pay)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="req")


class _NoProgress:
    """What ``_run`` calls on a progress bar, doing nothing."""

    def update(self, count: int) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LLM:
    """Generate from many prompts at once with continuous batching.

    Engine options take vLLM's names: dtype, device, load_format, quantization, seed,
    max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
    gpu_memory_utilization, kv_cache_memory_bytes, num_gpu_blocks_override,
    enable_prefix_caching (default True), scheduling_policy ("fcfs", "priority" or
    "lpm", longest cached prefix first), tokenizer, revision, generation_config,
    skip_tokenizer_init, num_threads (CPU), speculative_config (a dict, e.g. {"method":
    "ngram", "num_speculative_tokens": 3}; off by default), tensor_parallel_size (split
    the model over that many GPUs, or CPU processes), distributed_executor_backend ("mp",
    the default: processes on this host; "ray": Ray actors on an existing Ray cluster),
    distributed_timeout_s (how long a step may wait on a tensor-parallel worker before
    the engine fails, default 300).
    With no model named, the embedded demo model runs.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        if model is not None:
            engine_options["model"] = model
        self.engine = LLMEngine.from_kwargs(**engine_options)
        self._metrics = EngineMetrics(str(self.engine.config.load.model))

    def get_tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        # The transformers tokenizer itself, also where the engine holds the tokenizer
        # cache's stand-in (model/tokenizer_cache.py).
        return transformers_tokenizer(self.engine.tokenizer)

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request that passes no SamplingParams gets: the model's
        generation_config.json settings (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens as max_tokens) over SamplingParams' defaults."""
        return SamplingParams(**self.engine.generation_defaults)

    def get_metrics(self, prefix: str = "lanner") -> list[Metric]:
        """The engine's metrics as values (vLLM's LLM.get_metrics): the server's /metrics
        series over this LLM's finished requests, with the engine's current load.
        ``prefix="vllm"`` names them as vLLM does."""
        self._metrics.prefix = check_prefix(prefix)
        return self._metrics.read(self.engine.core.stats())

    def reset_prefix_cache(self) -> bool:
        """Drop every cached KV block no request uses. True when the cache ended empty;
        False when unfinished requests still hold cached blocks."""
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt that fails validation raises ValueError before anything runs."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ValueError(
                f"prompts must be a string, a prompt dict or a list of them, got "
                f"{type(prompts).__name__}"
            )
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts; "
                    f"pass one, or one per prompt"
                )
        if priority is not None:
            priority = list(priority)
            if len(priority) != len(prompts):
                raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        priorities = priority if priority is not None else [0] * len(prompts)
        # Validate every prompt, params entry and priority first, so bad input anywhere
        # leaves nothing half-queued.
        tokenized = []
        for index, (prompt, params, prio) in enumerate(
            zip(prompts, params_list, priorities, strict=True)
        ):
            try:
                tokenized.append(self.engine.validate_request("", prompt, params, prio))
            except ValueError as err:
                raise ValueError(f"prompt {index}: {err}") from None
        request_ids = []
        for (text, token_ids), params, prio in zip(tokenized, params_list, priorities, strict=True):
            request_id = self.engine.new_request_id()
            prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
            if text is not None:
                prompt["prompt"] = text
            self.engine.add_request(request_id, prompt, params, priority=prio)
            request_ids.append(request_id)
        if use_tqdm is None:
            use_tqdm = len(prompts) >= _PROGRESS_MIN_PROMPTS
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the
        tokenizer's chat template."""
        is_batch = isinstance(messages, Sequence) and messages and isinstance(messages[0], list)
        conversations = messages if is_batch else [messages]
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError(
                "chat needs the tokenizer, which skip_tokenizer_init=True left unloaded"
            )
        prompts: list[PromptType] = []
        for index, messages_of_one in enumerate(conversations):
            try:
                conversation = conversation_from_messages(messages_of_one)
                for message in conversation:
                    check_unicode("message content", message["content"])
                text = render_chat_template(
                    tokenizer, conversation, add_generation_prompt, chat_template
                )
            except ValueError as err:
                where = f"conversation {index}: " if is_batch else ""
                raise ValueError(f"{where}{err}") from None
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = progress_bar(len(request_ids)) if use_tqdm else _NoProgress()
        started = time.perf_counter()
        output_tokens = 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        self._metrics.on_request_finished(output)
                        output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        elapsed = time.perf_counter() - started
                        postfix = f"output {output_tokens / elapsed:.0f} tok/s"
                        spec = self.engine.core.spec
                        if spec is not None and spec.policy.stats.num_drafts:
                            length = spec.policy.stats.mean_acceptance_length
                            postfix += f", accepted length {length:.2f}"
                        bar.set_postfix_str(postfix)
        except BaseException:
            # Leave the engine clean for the next call (e.g. after Ctrl-C).
            self.engine.abort_request(list(wanted - set(finished)))
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]
