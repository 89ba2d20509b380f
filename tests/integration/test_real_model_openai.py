"""Structured outputs and tool calls with a real model (SmolLM2-135M-Instruct), through the
official `openai` client, served with offloading on (static ratio 0.5).

* 20 prompts, each with its own ``json_schema`` response format: every answer is JSON that
  validates against its schema (``jsonschema``) and ends with finish_reason "stop".
* A tool call with ``tool_choice: "required"``: valid arguments for the function's schema.

The model is the built-in ``smollm2-135m-instruct``; on a branch without it the module is
skipped, saying so.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.integration.serve_helpers import running_app

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "smollm2-135m-instruct"
APP = "real-model-openai"


def _model_or_skip() -> None:
    from adrenaline.config import ConfigError
    from adrenaline.model.resolve import resolve_model_dir

    try:
        resolve_model_dir(MODEL)
    except ConfigError as e:
        pytest.skip(f"{MODEL!r} is not a known built-in model here: {e}")


def _str(n: int = 40) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": n}


def _obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": sorted(props),
            "additionalProperties": False}


# (prompt, schema): bounded strings and numbers, so a small model cannot run on forever.
CASES = [
    ("Describe a person named Alice who is 30.", _obj(name=_str(), age={"type": "integer",
                                                                      "minimum": 0,
                                                                      "maximum": 120})),
    ("What is the capital of France?", _obj(country=_str(), capital=_str())),
    ("Is water wet? Answer yes or no.", _obj(answer={"enum": ["yes", "no"]})),
    ("Give me a color and its hex code.", _obj(color=_str(20), hex=_str(7))),
    ("List three fruits.", _obj(fruits={"type": "array", "items": _str(20), "minItems": 3,
                                        "maxItems": 3})),
    ("Rate the movie Titanic from 1 to 5.", _obj(title=_str(), stars={"type": "integer",
                                                                      "minimum": 1,
                                                                      "maximum": 5})),
    ("Name a planet and whether it has rings.", _obj(planet=_str(20),
                                                     has_rings={"type": "boolean"})),
    ("Write a short book title and its author.", _obj(title=_str(), author=_str())),
    ("Give the temperature in Paris today in Celsius.", _obj(city=_str(20), celsius={
        "type": "number", "minimum": -50, "maximum": 60})),
    ("Convert 3 km to meters.", _obj(km={"type": "integer", "minimum": 0, "maximum": 100},
                                     meters={"type": "integer", "minimum": 0,
                                             "maximum": 100000})),
    ("Describe a dog.", _obj(breed=_str(), size={"enum": ["small", "medium", "large"]})),
    ("What day comes after Monday?", _obj(day={"enum": ["Monday", "Tuesday", "Wednesday",
                                                        "Thursday", "Friday", "Saturday",
                                                        "Sunday"]})),
    ("Give a city and its population.", _obj(city=_str(), population={
        "type": "integer", "minimum": 0, "maximum": 50000000})),
    ("Summarize: the cat sat on the mat.", _obj(summary=_str(60))),
    ("Give two numbers and their sum.", _obj(a={"type": "integer", "minimum": 0, "maximum": 99},
                                             b={"type": "integer", "minimum": 0, "maximum": 99},
                                             sum={"type": "integer", "minimum": 0,
                                                  "maximum": 198})),
    ("Name a programming language and its creator.", _obj(language=_str(20), creator=_str())),
    ("Is 7 a prime number?", _obj(number={"type": "integer", "minimum": 0, "maximum": 100},
                                  prime={"type": "boolean"})),
    ("Give a user profile.", _obj(username=_str(20), email=_str(), active={"type": "boolean"})),
    ("Name an animal and where it lives.", _obj(animal=_str(20), habitat={
        "enum": ["ocean", "forest", "desert", "grassland", "arctic", "farm"]})),
    ("Give an address.", _obj(street=_str(), city=_str(20), zip=_str(10))),
]
WEATHER = _obj(city=_str(), unit={"enum": ["celsius", "fahrenheit"]})
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def api(request):
    _model_or_skip()  # before starting Ray
    request.getfixturevalue("ray_cluster")
    args = {"model": MODEL, "prefill": {"num_instances": 1},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": 8192}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 8192}},
            "policy": "static", "policy_options": {"ratio": 0.5}}
    with running_app(args, APP) as http:
        yield f"{str(http.base_url).rstrip('/')}/v1"


def _run(base_url: str, make):
    async def main():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                    timeout=600)
        return await asyncio.gather(*make(client))

    return asyncio.run(main())


def test_json_schema_answers_validate(api):
    def make(client):
        return [client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=200, response_format={"type": "json_schema", "json_schema": {
                "name": f"case{i}", "schema": schema}}) for i, (prompt, schema) in
            enumerate(CASES)]

    responses = _run(api, make)
    assert len(responses) == 20
    for (prompt, schema), r in zip(CASES, responses):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_required_tool_call_has_valid_arguments(api):
    def make(client):
        return [client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200, **kw)
            for kw in ({}, {"parallel_tool_calls": False})]

    for r in _run(api, make):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
