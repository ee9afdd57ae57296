"""Reading OpenAI-style request bodies: typed fields, messages, stop strings and sampling, with errors as
OpenAI's {"error": {message, type, param, code}} objects."""

import json

from starlette.responses import JSONResponse

from .errors import HeteroError
from .generate import SamplingParams

ROLES = {"system", "developer", "user", "assistant", "tool"}


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self, headers=None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)



def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


_EXPECT = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string"}
_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def _field(body: dict, name: str, kind: str, default=None, ok=lambda v: True, expect: str = ""):
    """body[name] checked for type and range; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not _KINDS[kind](value) or not ok(value):
        raise bad_request(f"'{name}' must be {expect or _EXPECT[kind]}, got {json.dumps(value)[:60]}", name)
    return value


# fields we accept but cannot honour: refused unless they hold their default, rather than silently ignored
_UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "logprobs": lambda v: not v,
    "top_logprobs": lambda v: not v, "logit_bias": lambda v: not v, "echo": lambda v: not v,
    "suffix": lambda v: not v, "best_of": lambda v: v in (None, 1),
    "frequency_penalty": lambda v: not v, "presence_penalty": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


async def read_body(request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes; this server takes at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, is_default in _UNSUPPORTED.items():
        if not is_default(body.get(name)):
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    _field(body, "model", "str")
    _field(body, "stream", "bool")
    _field(body, "n", "int", ok=lambda v: v == 1, expect="1 (one answer per request)")
    return body


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        if isinstance(content, list):  # content parts: only text can be given to a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                           f"{where}.content")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise bad_request("'stop' must be a string or a list of strings", "stop")


def parse_sampling(body: dict, model, n_prompt: int, param: str) -> SamplingParams:
    """Sampling from the request; unset fields take the model's generation_config.json, then OpenAI's defaults."""
    kv = model.context_tokens
    room = kv - n_prompt
    if room < 1:
        raise bad_request(f"the prompt is {n_prompt} tokens, and this server's context holds {kv} tokens for the prompt "
                   "and the answer together; send a shorter prompt (or start the server with a larger --context)",
                   param, "context_length_exceeded")
    g = model.generation_config
    positive = dict(ok=lambda v: v >= 1, expect="an integer >= 1")
    max_tokens = _field(body, "max_completion_tokens", "int", **positive)
    max_tokens = _field(body, "max_tokens", "int", **positive) if max_tokens is None else max_tokens
    temperature = _field(body, "temperature", "number", g.get("temperature", 1.0), lambda v: 0 <= v <= 2,
                         "a number from 0 to 2")
    top_p = _field(body, "top_p", "number", g.get("top_p", 1.0), lambda v: 0 <= v <= 1, "a number from 0 to 1")
    if top_p == 0:  # a nucleus of probability 0 holds only the most likely token
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_new_tokens=room if max_tokens is None else min(max_tokens, room),  # never past the KV reservation
        temperature=temperature, top_p=top_p,
        # top_k and repetition_penalty are not OpenAI's, but llama.cpp and vLLM take them too
        top_k=_field(body, "top_k", "int", g.get("top_k", 0), lambda v: v >= 0, "an integer >= 0"),
        repetition_penalty=_field(body, "repetition_penalty", "number", g.get("repetition_penalty", 1.0),
                                  lambda v: v > 0, "a number > 0"),
        seed=_field(body, "seed", "int", None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer"),
        stop=_stop(body), eos_token_ids=frozenset(model.tokenizer.eos_token_ids),
    )


def checked_ids(fn, param: str) -> list[int]:
    try:
        ids = fn()
    except HeteroError as e:
        raise bad_request(str(e), param) from None
    if not ids:
        raise bad_request("the prompt is empty", param)
    return ids
