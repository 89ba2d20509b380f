"""Recovery at the router: how an attempt on a lost cluster stops and its request reruns.

One pass of a request through the cluster is an *attempt* on one cluster generation
(serve/supervisor.py replaces the whole cluster when an actor dies and bumps the
generation). An attempt on a lost generation ends with ``Restart``; the request then
reruns on the replacement from its prompt plus the tokens already yielded
(``recompute_request``), so the client sees each token exactly once.
"""

from __future__ import annotations

import asyncio

import msgspec

from adrenaline.protocol import GenerateRequest, TokenDelta

RESTART = "restart"  # finish_reason of the sentinel that stops an attempt on a lost cluster


class Restart(Exception):
    """The cluster this attempt ran on was lost: rerun the request on its replacement."""


def recompute_request(req: GenerateRequest, produced: list[int]) -> GenerateRequest:
    """The request that continues ``req`` after ``produced`` tokens were already streamed.

    Its prompt is the original prompt plus those tokens, so its first token is the next
    one; max_tokens shrinks by as many, so the total length is unchanged.
    """
    if not produced:
        return req
    params = msgspec.structs.replace(req.params, max_tokens=req.params.max_tokens - len(produced))
    return GenerateRequest(request_id=req.request_id,
                           prompt_token_ids=list(req.prompt_token_ids) + list(produced),
                           params=params)


def drain(queue: asyncio.Queue[TokenDelta]) -> bool:
    """Drop what a lost attempt left queued (a rerun restarts from the yielded tokens).

    False when an abort was among it: the request is over.
    """
    aborted = False
    while not queue.empty():
        aborted |= queue.get_nowait().finish_reason == "abort"
    return not aborted
