"""Runs one instance's batch through the model: tokens in, sampled tokens out."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from infinite_llm.config import ModelConfig
from infinite_llm.control.plan import SampleResult, SeqWork
from infinite_llm.instance.attention import PartialMailbox, StepAttention, build_step_layout
from infinite_llm.instance.kv_cache import PagedKVCache
from infinite_llm.instance.sampler import sample_tokens


class ModelRunner:
    def __init__(self, rank: int, model: torch.nn.Module, model_config: ModelConfig, cache: PagedKVCache,
                 device: torch.device, send: Callable[[int, object], None], mailbox: PartialMailbox,
                 seed: int = 0, attention_timeout_s: float = 60.0) -> None:
        self.rank = rank
        self.model = model
        self.config = model_config
        self.cache = cache
        self.device = device
        self.send = send
        self.mailbox = mailbox
        self.attention_timeout_s = attention_timeout_s
        # On the model's device: the sampler draws the noise of a whole batch there, in one call.
        self.generator = torch.Generator(device=device).manual_seed(seed * 1000003 + rank)

    @torch.inference_mode()
    def execute(self, batch: list[SeqWork], step: int,
                called_off: Optional[Callable[[float], bool]] = None) -> list[SampleResult]:
        """Runs the batch; `called_off(layers_done)`, asked twice per layer (StepAttention), may
        end the step there with `StepInterrupted` (KV written so far is rewritten when redone)."""
        layout = build_step_layout(batch, self.rank, self.cache.block_size, self.device)
        assert self.config.head_dim is not None
        attention = StepAttention(self.rank, step, layout, self.cache, self.send, self.mailbox,
                                  self.config.num_attention_heads, self.config.head_dim, self.attention_timeout_s,
                                  called_off)
        input_ids = torch.tensor([t for w in batch for t in w.token_ids], dtype=torch.long, device=self.device)
        positions = torch.tensor([p for w in batch for p in range(w.start_pos, w.end_pos)],
                                 dtype=torch.long, device=self.device)
        try:
            hidden = self.model(input_ids, positions, attention)
        finally:
            self.mailbox.drop_step(step)
        rows, sampled, row = [], [], 0
        for work in batch:
            row += len(work.token_ids)
            if work.sample:
                rows.append(row - 1)
                sampled.append(work)
        if not sampled:
            return []
        logits = self.model.compute_logits(hidden[rows])
        return self._sample(logits, sampled)

    def _sample(self, logits: torch.Tensor, works: list[SeqWork]) -> list[SampleResult]:
        """Sample the batch at once; if that fails, one by one, so a request can fail only itself."""
        try:
            return self._sample_rows(logits, works)
        except Exception:  # noqa: BLE001 - isolated below
            results = []
            for i, work in enumerate(works):
                try:
                    results.extend(self._sample_rows(logits[i : i + 1], [work]))
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    results.append(SampleResult(work.request_id, -1, error=f"sampling failed: {exc}"))
            return results

    def _sample_rows(self, logits: torch.Tensor, works: list[SeqWork]) -> list[SampleResult]:
        tokens, logprobs = sample_tokens(
            logits, [w.sampling for w in works], [w.num_generated for w in works], self.generator
        )
        return [SampleResult(w.request_id, t, lp) for w, t, lp in zip(works, tokens, logprobs)]
