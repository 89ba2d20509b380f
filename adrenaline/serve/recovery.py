"""Recovery at the router: how an attempt that lost an actor stops and its request reruns.

One pass of a request through the cluster is an *attempt*. When an actor it depends on
is lost (serve/supervisor.py replaces that actor, or the whole cluster when several are
lost), the attempt (serve/attempt.py) ends with ``Restart``; the request then reruns from its prompt plus
the tokens already yielded (``recompute_request``), so the client sees each token
exactly once. Attempts that did not depend on the lost actor go on.
"""

from __future__ import annotations

import asyncio

import msgspec

from adrenaline.protocol import GenerateRequest, TokenDelta
from adrenaline.serve.attempt import Control, Restart

__all__ = ["Restart", "attempt_id", "drain", "recompute_request"]


def attempt_id(request_id: str, rerun: int) -> str:
    """The id actors know an attempt by: the request's own id first, then one per rerun."""
    return request_id if rerun == 0 else f"{request_id}#{rerun}"


def recompute_request(req: GenerateRequest, produced: list[int]) -> GenerateRequest:
    """The request that continues ``req`` after ``produced`` tokens were already streamed.

    Prefilled over its prompt plus those tokens, which stay output (counted against
    max_tokens and min_tokens, penalized, replayed into its grammar), so its first token
    is the next one. Prompt logprobs went out with the first token: not computed again.
    """
    if not produced:
        return req
    params = (req.params if req.params.prompt_logprobs is None
              else msgspec.structs.replace(req.params, prompt_logprobs=None))
    return GenerateRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                           params=params,
                           output_token_ids=list(req.output_token_ids) + list(produced))


def drain(queue: asyncio.Queue[TokenDelta | Control]) -> bool:
    """Drop what a lost attempt left queued (a rerun restarts from the yielded tokens).

    False when an abort was among it: the request is over.
    """
    aborted = False
    while not queue.empty():
        aborted |= queue.get_nowait() is Control.ABORT
    return not aborted
