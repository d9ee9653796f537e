"""Output processing: generated ids -> text, stop strings, stream deltas, results (no jax).

Path: runner -> scheduler.update (tokens appended, token-level stops) -> **output
processor** -> StreamDelta / RequestOutput -> async engine / session.

Per request it keeps an IncrementalDetokenizer and the text so far. For each new
token it decodes the text delta (EOS and stop-token ids end the request without
becoming text) and searches the stop strings in the text's tail; a hit cuts the text
before the stop string and finishes the request with "stop", also when the same token
reached max_tokens. Stop strings are not searched while fewer than min_tokens ids were
generated (vLLM's rule: the id that reaches min_tokens is checked). A request finished
for any other reason flushes the detokenizer's held-back bytes into the text.

Streaming: `delta()` releases the text not streamed yet, but holds back the last
`len(longest stop string) - 1` characters while the request runs (they could still
become a stop string, which must not reach the client), and the ids / logprobs added
since the previous delta.
"""
from __future__ import annotations

import time
from typing import Optional

from jaxinfer.engine.detokenizer import IncrementalDetokenizer
from jaxinfer.engine.request import Request
from jaxinfer.types import RequestOutput, StreamDelta


class _State:
    """Output-side state of one request."""

    def __init__(self, request: Request, tokenizer):
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids) if tokenizer is not None else None
        self.text = ""
        self.num_emitted_chars = 0  # text released in deltas
        self.num_emitted_tokens = 0  # ids released in deltas
        self.max_stop_len = max((len(s) for s in request.params.stop), default=0)


class OutputProcessor:
    """Detokenization, stop strings and the records handed back to clients.

    Args:
      tokenizer: the model's tokenizer, or None (text stays "").
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._states: dict = {}

    def add(self, request: Request) -> None:
        self._states[request.request_id] = _State(request, self.tokenizer)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def text(self, request_id: str) -> str:
        return self._states[request_id].text

    def process(self, request: Request, num_new: int) -> Optional[str]:
        """Turns the request's last `num_new` ids into text.

        Returns:
          "stop" when a stop string ended the request (the caller finishes it; ids
          after the one that completed the stop string are dropped), else None.
        """
        state = self._states[request.request_id]
        params = request.params
        first = len(request.output_ids) - num_new
        for i in range(first, len(request.output_ids)):
            token = request.output_ids[i]
            if state.detokenizer is None or request.is_stop_token(token):
                continue
            delta = state.detokenizer.add(token)
            if not delta:
                continue
            start = max(0, len(state.text) - state.max_stop_len + 1)
            state.text += delta
            if i + 1 < params.min_tokens:
                continue
            hits = [at for at in (state.text.find(stop, start) for stop in params.stop) if at >= 0]
            if hits:
                state.text = state.text[:min(hits)]
                del request.output_ids[i + 1:]
                del request.logprobs[i + 1:]
                del request.top_logprobs[i + 1:]
                return "stop"
        # (A stop string returned above; a stop token id, EOS or max_tokens flush.)
        if request.is_finished and state.detokenizer is not None:
            state.text += state.detokenizer.flush()
        return None

    def delta(self, request: Request) -> StreamDelta:
        """What the request produced since its previous delta (see the module docstring)."""
        state = self._states[request.request_id]
        end = len(state.text)
        if not request.is_finished and state.max_stop_len > 1:
            end = max(state.num_emitted_chars, end - state.max_stop_len + 1)
        text = state.text[state.num_emitted_chars:end]
        state.num_emitted_chars = end
        lo, hi = state.num_emitted_tokens, len(request.output_ids)
        state.num_emitted_tokens = hi
        params = request.params
        return StreamDelta(
            request_id=request.request_id, text=text, token_ids=tuple(request.output_ids[lo:hi]),
            logprobs=tuple(request.logprobs[lo:hi]) if params.want_logprobs else None,
            top_logprobs=tuple(request.top_logprobs[lo:hi]) if params.num_top_logprobs else None,
            finish_reason=request.finish_reason if request.is_finished else None,
            output=self.output(request) if request.is_finished else None,
            index=request.index, parent_request_id=request.parent_id)

    def output(self, request: Request) -> RequestOutput:
        """The request's result so far (its final result once it is finished)."""
        state = self._states[request.request_id]
        first = request.first_token_time
        ttft = (first or request.arrival_time) - request.arrival_time
        n = len(request.output_ids)
        tpot = ((request.last_token_time - first) / (n - 1)) if n > 1 else 0.0
        params = request.params
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=list(request.prompt_ids),
            token_ids=list(request.output_ids), text=state.text, finish_reason=request.finish_reason or "abort",
            logprobs=list(request.logprobs) if params.want_logprobs else None,
            top_logprobs=list(request.top_logprobs) if params.num_top_logprobs else None,
            prompt_logprobs=list(request.prompt_logprobs) if params.prompt_logprobs else None,
            time_to_first_token=ttft, time_per_output_token=tpot,
            decode_compile_seconds=request.decode_compile_seconds,
            queue_time=(request.first_scheduled_time or time.perf_counter()) - request.arrival_time,
            index=request.index, parent_request_id=request.parent_id,
            num_cached_tokens=request.num_cached_tokens or 0)
