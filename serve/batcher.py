"""Requests that arrive together run as one right-padded batch (Pipeline.steps), each row with its own
sampling settings, token limit, stop strings and event sink; a cancelled row stops being reported and
the batch ends early once every row is done or cancelled.

One worker thread owns the pipeline: it takes the first waiting request, waits `window_s` for others,
and runs up to `max_batch` of them. Every row gets the tokens it would get alone (the runtime's
batches are exact per row; sampling draws from each row's own generator).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from runtime.errors import Qwen3VLError
from runtime.generate import Timings
from runtime.sampling import SamplingConfig


class QueueFull(Exception):
    pass


@dataclass
class Job:
    chat: list  # runtime chat messages (images inside as PIL images)
    max_tokens: int
    sampling: SamplingConfig
    logprobs: int  # top-k alternatives per token (0: none)
    want_logprobs: bool
    stop: list[str]
    emit: object  # emit(kind, payload), called from the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the worker:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    logprob_items: list = field(default_factory=list)
    done: bool = False


class Batcher:
    def __init__(self, pipeline, max_batch: int = 8, max_queue: int = 32, window_s: float = 0.02, metrics=None):
        self.pipeline, self.max_batch, self.max_queue, self.window_s = pipeline, max_batch, max_queue, window_s
        self.metrics = metrics
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.running = 0
        self._thread = threading.Thread(target=self._work, name="qwen3vl-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- worker ----------------------------------------------------------------------------------

    def _take(self) -> list[Job]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
        deadline = time.monotonic() + self.window_s
        with self._cond:
            while len(self._queue) < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = []
            while self._queue and len(jobs) < self.max_batch:
                job = self._queue.popleft()
                if not job.cancelled.is_set():
                    jobs.append(job)
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if self._stopping:
                return
            if not jobs:
                continue
            self.running = len(jobs)
            try:
                self._run(jobs)
            finally:
                self.running = 0

    def _run(self, jobs: list[Job]) -> None:
        try:
            self._run_batch(jobs)
        except Qwen3VLError as exc:
            if len(jobs) > 1 and not any(job.token_ids or job.done for job in jobs):
                # One row's bad prompt or image refuses the whole batch before any step: run each
                # alone so only that request gets the error.
                for job in jobs:
                    self._run([job])
                return
            for job in jobs:
                if not job.done:
                    job.done = True
                    job.emit("error", exc)
        except Exception as exc:  # a bug or backend failure: every waiting row gets a 500, the server lives
            for job in jobs:
                if not job.done:
                    job.done = True
                    job.emit("error", exc)

    def _run_batch(self, jobs: list[Job]) -> None:
        timings = Timings()
        streams = [self.pipeline.prompts.text_stream() for _ in jobs]
        holdback = [max((len(s) for s in job.stop), default=1) - 1 for job in jobs]
        # with logprobs, at least one alternative: the step then carries each row's own token logprob
        top_k = max(1, *(j.logprobs for j in jobs)) if any(j.want_logprobs for j in jobs) else 0
        steps = self.pipeline.steps([job.chat for job in jobs], [[] for _ in jobs], max(j.max_tokens for j in jobs),
                                    [job.sampling for job in jobs], top_k, timings)
        try:
            lengths = next(steps)
            count = 0
            for step in steps:
                count += 1
                for r, job in enumerate(jobs):
                    if job.done or not step.active[r]:
                        continue
                    if job.cancelled.is_set():
                        job.done = True
                        continue
                    token = int(step.tokens[r])
                    job.token_ids.append(token)
                    if job.want_logprobs:
                        job.logprob_items.append((token, float(step.token_logprobs[r]),
                                                  step.logprobs[r][:job.logprobs]))
                    job.text += streams[r].step(token)
                    if step.finished[r] or len(job.token_ids) >= job.max_tokens:
                        job.text += streams[r].finish()  # a character the limit cut, as generate shows it
                    reason = None
                    for s in job.stop:
                        at = job.text.find(s)
                        if at >= 0:
                            job.text, reason = job.text[:at], "stop"
                    if reason is None and step.finished[r]:
                        reason = "stop"
                    if reason is None and len(job.token_ids) >= job.max_tokens:
                        reason = "length"
                    if reason is None:
                        visible = len(job.text) - holdback[r]
                        if visible > job.sent:
                            job.emit("text", job.text[job.sent:visible])
                            job.sent = visible
                        continue
                    if len(job.text) > job.sent:
                        job.emit("text", job.text[job.sent:])
                        job.sent = len(job.text)
                    job.done = True
                    job.emit("done", {"finish_reason": reason, "prompt_tokens": int(lengths[r]),
                                      "cached_tokens": _cached_tokens(timings, r),
                                      "completion_tokens": len(job.token_ids),
                                      "timings": {**timings.to_dict(), "backend": self.pipeline.backend.name,
                                                  "batch_rows": len(jobs)}})
                    if self.metrics is not None:
                        self.metrics.finished(len(job.token_ids), timings.ttft_ms / 1000)
                if all(job.done for job in jobs):
                    break
            for r, job in enumerate(jobs):  # the context ran out before a row's own limit
                if not job.done:
                    job.done = True
                    job.text += streams[r].finish()
                    if len(job.text) > job.sent:
                        job.emit("text", job.text[job.sent:])
                    job.emit("done", {"finish_reason": "length", "prompt_tokens": int(lengths[r]),
                                      "cached_tokens": _cached_tokens(timings, r),
                                      "completion_tokens": len(job.token_ids),
                                      "timings": {**timings.to_dict(), "backend": self.pipeline.backend.name,
                                                  "batch_rows": len(jobs)}})
        finally:
            steps.close()


def _cached_tokens(timings: Timings, row: int) -> int:
    """The row's prompt tokens served from the pipeline's prefix cache (0 before its prefill)."""
    return int(timings.cached_tokens[row]) if row < len(timings.cached_tokens) else 0
