"""The OpenAI-compatible HTTP surface, without HTTP: parse, validate, format.

Modules, none of which touches Ray or FastAPI (so they are unit-testable); the
ingress (serve/ingress.py) is the HTTP side:

* ``errors``: ``APIError`` (what a client sees) and the mapping of router exceptions to it.
* ``requests``: a raw JSON body -> ``ParsedRequest``, validated against the model.
* ``responses``: TokenDeltas -> OpenAI response bodies, stream chunks and SSE framing
  (per choice: stop strings cut and held back, tool calls collected).
* ``tools``: chat tool calling: tools in the prompt, the schema forcing a call, parsing
  (complete calls only, when the output was cut by max_tokens).
* ``prompt_logprobs``: prompt logprobs in responses (echo + logprobs; vLLM's field).
* ``batch``: several prompts in one completions request: one choice per prompt and n.
* ``utility``: vLLM's /tokenize, /detokenize and /version bodies.
"""
