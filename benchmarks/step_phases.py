"""Where an engine core's step goes on the host, phase by phase: wall time of the calls
the loop makes each step (reading the step back, the grammars' advance and bitmask fill,
scheduling, the launches, ...), per thread, and of Python's collections, for
benchmarks/structured_host_step.py (CPU) and engine_workloads.py W10 --phases (GPU).

``StepPhases(core)`` wraps those calls on one core (its instance attributes, and
xgrammar's batch fill for the whole process) until ``close()``; ``begin_step`` /
``end_step`` bracket each step whose phases count, and ``summary()`` gives each
phase's mean milliseconds per counted step. Phases nest (``core._collect`` holds
``runner.collect``, ...: see _CORE_PHASES); xgrammar's fill is counted apart on the
fill thread.
"""

from __future__ import annotations

import gc
import importlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# (owner path on the core, method): the phase is named "owner.method" ("core." for the
# core's own). Each timed call costs ~2-5 µs (two clocks of each kind, a lock): ~12 a
# step here, a few % of a batch-1 step.
_CORE_PHASES = [
    ("", "_launch"),  # holds scheduler.schedule, _fill_grammar_bitmasks (drafts), the
    # step before's deferred sampling (wait_for_fill, sample_deferred) and runner.launch
    ("scheduler", "schedule"),
    ("structured_outputs", "wait_for_fill"),
    ("runner", "sample_deferred"),
    ("runner", "launch"),
    ("", "_collect"),  # holds runner.collect, _advance_grammars, _fill_grammar_bitmasks
    # (the deferred step's) and each request's _append_tokens (not timed: ~3 µs a call
    # of timing, 256 calls a step, would slow the loop it measures)
    ("runner", "collect"),  # on a GPU: mostly waiting for the device
    ("", "_advance_grammars"),
    ("", "_fill_grammar_bitmasks"),  # holds structured_outputs._prepare, and the fill
    # itself when it runs on the loop's thread
    ("structured_outputs", "start_fill"),  # holds _prepare, and the hand-over to the
    # fill thread (or the fill itself, for a few rows)
    ("structured_outputs", "_prepare"),
    ("", "_trim_deferred_rows"),
    ("runner.sampler", "launch"),  # inside runner.launch or runner.sample_deferred
]

# Module functions the sampler calls by name (and a class's method), timed where they run
# (host time only on a GPU: their kernels are queued), to split runner.sample_deferred.
_MODULE_PHASES = [
    ("lanner.runner.sampler", "", "prepare_grammar_masks"),
    ("lanner.runner.sampler", "GrammarMasks", "apply"),
    ("lanner.runner.sampler", "", "apply_penalties"),
    ("lanner.runner.sampler", "", "sample"),
]

# Counted apart inside core._launch (the deferred sampling: launched there, after the
# next step's scheduling, or earlier at the end of the step that filled its bitmasks).
_BY_CALLER = frozenset({"runner.sample_deferred"})


class StepPhases:
    """Per-phase wall time of one core's steps (see the module docstring)."""

    def __init__(self, core: Any) -> None:
        self._loop_thread = threading.get_ident()
        self._totals: dict[str, float] = defaultdict(float)
        self._cpu: dict[str, float] = defaultdict(float)  # the calling thread's CPU time
        self._calls: dict[str, int] = defaultdict(int)
        self._counting = False
        self._steps = 0
        self._step_started = self._step_cpu_started = 0.0
        self._lock = threading.Lock()
        self._active: list[str] = []  # the loop thread's phases under way, outermost first
        self._undo: list[Callable[[], None]] = []
        for path, attribute in _CORE_PHASES:
            owner = core
            for part in path.split(".") if path else ():
                owner = getattr(owner, part, None)
            if owner is not None and hasattr(owner, attribute):  # (a runner may not sample)
                self._wrap_instance(owner, attribute, f"{path or 'core'}.{attribute}")
        for module_name, class_name, attribute in _MODULE_PHASES:
            owner: Any = importlib.import_module(module_name)
            if class_name:
                owner = getattr(owner, class_name)
            self._wrap_class(
                owner, attribute, f"sampler.{class_name + '.' if class_name else ''}{attribute}"
            )
        try:
            import xgrammar
        except ImportError:
            xgrammar = None
        if xgrammar is not None:  # its fills: the batch call, and each matcher's own
            for owner, attribute in (
                (xgrammar.BatchGrammarMatcher, "batch_fill_next_token_bitmask"),
                (xgrammar.GrammarMatcher, "fill_next_token_bitmask"),
            ):
                self._wrap_class(owner, attribute, f"xgrammar.{owner.__name__}.{attribute}")
        self._gc_started = self._gc_cpu_started = 0.0
        gc.callbacks.append(self._on_gc)
        self._undo.append(lambda: gc.callbacks.remove(self._on_gc))

    def _wrap_class(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        setattr(owner, attribute, self._timed(original, name))
        self._undo.append(lambda: setattr(owner, attribute, original))

    def _wrap_instance(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        setattr(owner, attribute, self._timed(original, name))
        self._undo.append(lambda: owner.__dict__.pop(attribute, None))

    def _timed(self, fn: Callable, name: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            on_loop = threading.get_ident() == self._loop_thread
            started, cpu_started = time.perf_counter(), time.thread_time()
            if on_loop:
                self._active.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                if on_loop:
                    self._active.pop()
                if self._counting:
                    where = "" if on_loop else " [fill thread]"
                    if name in _BY_CALLER:
                        where += " [in core._launch]" if "core._launch" in self._active else ""
                    with self._lock:
                        self._totals[name + where] += time.perf_counter() - started
                        self._cpu[name + where] += time.thread_time() - cpu_started
                        self._calls[name + where] += 1

        return timed

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started, self._gc_cpu_started = time.perf_counter(), time.thread_time()
        elif self._counting and self._gc_started:
            name = f"gc.generation_{info['generation']}"
            with self._lock:
                self._totals[name] += time.perf_counter() - self._gc_started
                self._cpu[name] += time.thread_time() - self._gc_cpu_started
                self._calls[name] += 1

    def begin_step(self) -> None:
        self._counting = True
        self._step_started, self._step_cpu_started = time.perf_counter(), time.thread_time()

    def end_step(self) -> None:
        with self._lock:
            self._totals["step"] += time.perf_counter() - self._step_started
            self._cpu["step"] += time.thread_time() - self._step_cpu_started
            self._calls["step"] += 1
        self._steps += 1

    def pause(self) -> None:
        """Stop counting (between runs whose steps should not count)."""
        self._counting = False

    def summary(self) -> dict[str, dict[str, float]]:
        """Each phase's mean wall ms per counted step, the CPU ms its thread spent in it
        (less than the wall where it waited: for the device, a lock, a core), and its
        calls per step, by name."""
        steps = max(self._steps, 1)
        return {
            name: {
                "ms_per_step": round(self._totals[name] / steps * 1e3, 4),
                "cpu_ms_per_step": round(self._cpu[name] / steps * 1e3, 4),
                "calls_per_step": round(self._calls[name] / steps, 2),
            }
            for name in sorted(self._totals)
        } | {"counted_steps": {"steps": self._steps}}  # type: ignore[dict-item]

    def reset(self) -> None:
        with self._lock:
            self._totals.clear()
            self._cpu.clear()
            self._calls.clear()
        self._steps = 0

    def close(self) -> None:
        self._counting = False
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
