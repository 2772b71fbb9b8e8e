"""Sizes the chunks of running prompts from measured step times (pure Python).

A step that carries a prompt chunk makes every request in it, and every request that arrives
meanwhile, wait for it. The pacer learns the time of a decode-only step (an average over recent
ones; it asks for one on purpose when it has none or its figure is old) and the cost per prompt
token of recent steps, and caps the next chunk at what fits in `slowdown` times a decode-only
step while others decode or wait. A chunk's cost per token grows with its position (attention
over the whole prefix), so the cap shrinks as a long prompt advances. When even one token does
not fit, the prompt still gets one token every `min_progress_every` steps: it is slowed, never
starved.

A prompt running alone with all its KV at home takes the whole budget: small chunks would waste
the step's fixed cost (every weight read once per step) with nobody to make room for. A request
that arrives during such a step would wait for all of it, so the instance calls the step off at
its next check (`interrupts`) when the rest of it would take longer than `lone_slowdown` - 1
decode-only steps; the prompt redoes that chunk, paced, beside the newcomer.

A prompt alone on a `shared` instance is paced to `lone_slowdown` times a decode-only step
instead: other instances' requests wait on this one's steps (it holds their KV, or the prompt's
KV spans instances and its chunk's attention runs on its holders between their own steps; a
whole-budget chunk deep into a long context would hold them up for seconds). It gets at least a
sixteenth of the budget per step.
"""

from __future__ import annotations

from typing import Optional


class PrefillPacer:
    def __init__(self, budget: int, slowdown: float = 2.0, lone_slowdown: float = 4.0,
                 probe_every: int = 64, min_progress_every: int = 16, smoothing: float = 0.3) -> None:
        if min(slowdown, lone_slowdown) <= 1.0:
            raise ValueError(f"the allowed slowdowns must be > 1, got {slowdown}, {lone_slowdown}")
        self.budget = budget
        self.slowdown = slowdown
        self.lone_slowdown = lone_slowdown
        self.probe_every = probe_every
        self.min_progress_every = min_progress_every
        # Per-token cost measured on small chunks overstates it (a chunk's fixed cost of reading
        # the whole prefix is split over few tokens): a paced prompt alone never crawls.
        self.lone_floor = max(1, budget // 16)
        self.smoothing = smoothing
        self.decode_step_s: Optional[float] = None
        self.prefill_token_s: Optional[float] = None
        self._steps_since_probe = 0
        self._starved_steps = 0

    def next_cap(self, has_decodes: bool, contended: bool, shared: bool = False) -> Optional[int]:
        """Cap for the next step's running-prompt chunks (None: the scheduler's default; 0: none
        this step, e.g. a decode-only step to measure). `contended`: requests here decode or wait;
        `shared`: other instances' requests wait on this one's steps."""
        if has_decodes and (self.decode_step_s is None or self._steps_since_probe >= self.probe_every):
            return 0
        if (not contended and not shared) or self.decode_step_s is None or self.prefill_token_s is None:
            return None
        if not contended:
            fit = int((self.lone_slowdown - 1.0) * self.decode_step_s / self.prefill_token_s)
            return min(self.budget, max(fit, self.lone_floor))
        fit = int((self.slowdown - 1.0) * self.decode_step_s / self.prefill_token_s)
        if fit >= 1:
            self._starved_steps = 0
            return min(fit, self.budget)
        self._starved_steps += 1
        if self._starved_steps >= self.min_progress_every:
            self._starved_steps = 0
            return 1
        return 0

    def interrupts(self, elapsed_s: float, fraction_done: float) -> bool:
        """Whether a step of prompts running alone, `fraction_done` through its layers after
        `elapsed_s`, is called off for a request that just arrived: the rest of it would make the
        newcomer wait more than `lone_slowdown` - 1 decode-only steps (before the first decode
        step is measured, any wait is too long)."""
        if fraction_done <= 0.0:
            return True
        remaining_s = elapsed_s * (1.0 - fraction_done) / fraction_done
        return remaining_s > (self.lone_slowdown - 1.0) * (self.decode_step_s or 0.0)

    def observe(self, step_s: float, prefill_tokens: int, num_decodes: int) -> None:
        if prefill_tokens == 0:
            if num_decodes:
                self._steps_since_probe = 0
                self.decode_step_s = self._average(self.decode_step_s, step_s)
            return
        self._steps_since_probe += 1
        if self.decode_step_s is not None:
            per_token = max(step_s - self.decode_step_s, 1e-9) / prefill_tokens
            # Shrink at once (the bound), grow slowly (costs rise with a prompt's position).
            old = self.prefill_token_s
            self.prefill_token_s = per_token if old is None or per_token > old else self._average(old, per_token)

    def _average(self, old: Optional[float], new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
