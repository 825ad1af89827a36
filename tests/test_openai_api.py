"""The OpenAI-compatible HTTP API against a real engine on the tiny checkpoint (no Ray)."""

import asyncio
import contextlib
import json

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from models.generate import greedy_generate
from router.async_engine import AsyncEngine
from router.auth import check_bearer, load_api_token
from router.engine import Engine, EngineConfig
from router.openai_api import LocalEngineClient, ServiceUnavailable, build_openai_app
from router.request import GenerationOutput, GenerationRequest, Usage
from router.sampling import SamplingParams

BLOCK_BYTES = 4 * 2 * 16 * 4 * 2  # tiny preset, block of 4 tokens (see test_engine.py)
MODEL = "tiny-moe"
GOOD = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    # One running and one waiting request at most, so the overload test can fill the engine deterministically.
    config = EngineConfig(kv_cache_bytes=4096 * BLOCK_BYTES, block_size=4, max_tokens_per_step=24, max_num_seqs=1,
                          max_waiting=1)
    aengine = AsyncEngine(Engine(model, tokenizer, config))
    yield aengine
    aengine.shutdown()


@pytest.fixture(scope="module")
def client(engine, tokenizer):
    return LocalEngineClient(engine, tokenizer, MODEL)


@pytest.fixture(scope="module")
def http(client):
    return TestClient(build_openai_app(lambda: client, api_token=None))


def _greedy_text(model, tokenizer, prompt_ids, n):
    tokens = greedy_generate(model, torch.tensor([prompt_ids]), n)[0].tolist()
    return tokenizer.decode(tokens, skip_special_tokens=True)  # what the engine's stream emits


def _events(response):
    """The SSE payloads of a response, "[DONE]" kept as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]" and response.text.endswith("data: [DONE]\n\n")
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


def _assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def _assert_serves(http):
    r = http.post("/v1/completions", json={**GOOD, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


# ----------------------------------------------------------------------------- happy paths


def test_models_lists_the_served_model(http):
    data = http.get("/v1/models").json()
    assert data["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in data["data"]] == [(MODEL, "model", 4096)]


def test_completion_is_the_engines_greedy_output(http, model, tokenizer):
    r = http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = tokenizer.encode(GOOD["prompt"])
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert r.headers["x-request-id"] == body["id"]
    [choice] = body["choices"]
    assert choice["text"] == _greedy_text(model, tokenizer, prompt, 12)
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
    # Token ids are taken as given (no BOS added), and X-Request-Id names the request.
    r = http.post("/v1/completions", json={**GOOD, "prompt": prompt, "logprobs": 2}, headers={"X-Request-Id": "abc-1"})
    assert r.json()["id"] == "abc-1" and r.headers["x-request-id"] == "abc-1"
    assert r.json()["choices"][0]["text"] == choice["text"]
    logprobs = r.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 12
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])


def test_completion_stream_concatenates_to_the_full_text(http):
    full = http.post("/v1/completions", json=GOOD).json()["choices"][0]["text"]
    events = _events(http.post("/v1/completions", json={**GOOD, "stream": True,
                                                        "stream_options": {"include_usage": True}}))
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


def test_chat_renders_the_checkpoints_template(http, model, tokenizer):
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True), add_bos=False)
    expected = _greedy_text(model, tokenizer, prompt, 10)
    request = {"model": MODEL, "messages": CHAT, "max_completion_tokens": 10, "temperature": 0, "ignore_eos": True}
    body = http.post("/v1/chat/completions", json=request).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(prompt)
    events = _events(http.post("/v1/chat/completions", json={**request, "stream": True, "logprobs": True,
                                                             "top_logprobs": 3}))
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    content = [entry for c in chunks for entry in c["choices"][0]["logprobs"]["content"]]
    assert len(content) == 10 and all(len(e["top_logprobs"]) == 3 for e in content)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"prompt": "x",', None),  # malformed JSON
    ("/v1/completions", b"[1, 2]", None),  # not an object
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 1000}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10 ** 6]}, None),  # the engine knows the vocabulary
    ("/v1/completions", {"prompt": [5] * 5000}, "prompt"),
    ("/v1/completions", {"prompt": [5] * 4090, "max_tokens": 10}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": CHAT[::-1]}, "messages"),  # the template wants the system message first
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_requests_are_400_and_the_server_keeps_serving(http, path, body, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    error = _assert_error(http.post(path, **kwargs), 400, param)
    assert error["type"] == "invalid_request_error"
    if param:
        assert param.split("[")[0] in error["message"]  # the message names what to fix
    _assert_serves(http)


def test_unknown_model_is_404(http):
    _assert_error(http.post("/v1/completions", json={**GOOD, "model": "gpt-4"}), 404, "model", "model_not_found")
    _assert_serves(http)


def test_huge_body_is_413(http):
    huge = json.dumps({**GOOD, "prompt": "a" * (5 << 20)}).encode()
    _assert_error(http.post("/v1/completions", content=huge), 413)
    # Without a Content-Length the body is counted as it arrives.
    chunked = (huge[i:i + (1 << 20)] for i in range(0, len(huge), 1 << 20))
    _assert_error(http.post("/v1/completions", content=chunked), 413)
    _assert_serves(http)


def test_overload_is_429(http, engine):
    busy = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    def fill():  # one request running (max_num_seqs=1) and one waiting (max_waiting=1)
        engine.engine.add_request(GenerationRequest("busy-1", (5, 6, 7), busy))
        engine.engine.step()
        engine.engine.add_request(GenerationRequest("busy-2", (5, 6, 7), busy))

    asyncio.run(engine.call(fill))
    try:
        error = _assert_error(http.post("/v1/completions", json=GOOD), 429, code="rate_limit_exceeded")
        assert "overloaded" in error["message"]
    finally:
        asyncio.run(engine.call(lambda: [engine.engine.abort(r) for r in ("busy-1", "busy-2")]))
    _assert_serves(http)


def test_not_ready_is_503():
    def not_ready():
        raise RuntimeError("not ready")

    def no_replica():
        raise ServiceUnavailable("no healthy router replica")

    for getter in (not_ready, no_replica):
        http = TestClient(build_openai_app(getter, api_token=None))
        _assert_error(http.get("/v1/models"), 503, code="service_unavailable")
        _assert_error(http.post("/v1/completions", json=GOOD), 503, code="service_unavailable")


def test_bearer_token_is_required_on_every_api_route(client):
    app = build_openai_app(lambda: client, api_token="s3cret")
    app.get("/healthz")(lambda: {"status": "SERVING"})  # a probe's route, added by the deployment, stays open
    http = TestClient(app)
    assert http.get("/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        _assert_error(http.get("/v1/models", headers=headers), 401, code="invalid_api_key")
        _assert_error(http.post("/v1/completions", json=GOOD, headers=headers), 401)
        _assert_error(http.post("/v1/chat/completions", json={"messages": CHAT}, headers=headers), 401)
    assert http.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
    r = http.post("/v1/completions", json={**GOOD, "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- streams that end badly


class FailingClient:
    """Streams one output, then fails the way a replica can: an error output, or an exception."""

    model_name, max_model_len = MODEL, 4096

    def __init__(self, tokenizer, how):
        self.tokenizer, self.how = tokenizer, how

    async def generate(self, request):
        yield GenerationOutput(request.request_id, (5,), "a", (-0.5,), (None,), None, Usage(3, 1))
        if self.how == "raise":
            raise ConnectionError("replica went away")
        yield GenerationOutput(request.request_id, (), "", (), (), "error", Usage(3, 1),
                               error="expert shard 2 stopped answering")


@pytest.mark.parametrize("how", ["error output", "raise"])
def test_mid_stream_failure_is_a_final_error_event(tokenizer, how):
    http = TestClient(build_openai_app(lambda: FailingClient(tokenizer, how), api_token=None))
    events = _events(http.post("/v1/completions", json={**GOOD, "stream": True}))
    assert events[0]["choices"][0]["text"] == "a"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "Traceback" not in json.dumps(events)
    if how == "error output":
        assert "expert shard 2" in error["message"]
        # Not streamed: the same failure is a 500 with the reason, not a half answer.
        assert "expert shard 2" in _assert_error(http.post("/v1/completions", json=GOOD), 500)["message"]


def test_trace_context_sees_the_request_headers(tokenizer):
    seen = []

    def trace_context(headers):
        seen.append(headers.get("traceparent"))
        return contextlib.nullcontext()

    http = TestClient(build_openai_app(lambda: FailingClient(tokenizer, "raise"), None, trace_context=trace_context))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    http.post("/v1/completions", json={**GOOD, "stream": True}, headers={"traceparent": parent})
    assert seen == [parent]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_client_disconnect_mid_stream_aborts_the_request(http, engine, spec_version):
    """2.3: Starlette hears http.disconnect; 2.4: the server reports the gone client by failing a send."""
    body = json.dumps({**GOOD, "max_tokens": 3000, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("test", 1), "server": ("test", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def main():
        got_chunk, body_sent = asyncio.Event(), []

        async def receive():
            if not body_sent:
                body_sent.append(True)
                return {"type": "http.request", "body": body, "more_body": False}
            await got_chunk.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                if got_chunk.is_set() and spec_version == "2.4":
                    raise OSError("connection reset by peer")
                got_chunk.set()

        with contextlib.suppress(ClientDisconnect, OSError):
            await asyncio.wait_for(http.app(scope, receive, send), timeout=10)
        e = engine.engine  # checked while this loop still runs (asyncio.run's exit would close any stream left)
        return await engine.call(lambda: (dict(e.sequences), e.blocks.num_free == e.blocks.num_blocks))

    assert asyncio.run(main()) == ({}, True)  # aborted (not 3000 tokens later) and every KV block is back
    _assert_serves(http)


# ----------------------------------------------------------------------------- auth helpers


def test_load_api_token(tmp_path):
    assert load_api_token({}) is None
    assert load_api_token({"MOE_SERVE_API_TOKEN": " tok "}) == "tok"
    secret = tmp_path / "token"
    secret.write_text("from-secret\n")
    assert load_api_token({"MOE_SERVE_API_TOKEN_FILE": str(secret)}) == "from-secret"
    with pytest.raises(RuntimeError, match="cannot be read"):  # a Secret that failed to mount must not open the API
        load_api_token({"MOE_SERVE_API_TOKEN_FILE": str(tmp_path / "missing")})
    secret.write_text("  \n")
    with pytest.raises(RuntimeError, match="is empty"):
        load_api_token({"MOE_SERVE_API_TOKEN_FILE": str(secret)})
    with pytest.raises(RuntimeError, match="set but empty"):  # an empty Secret value fails closed
        load_api_token({"MOE_SERVE_API_TOKEN": "  "})


def test_check_bearer():
    assert check_bearer(None, None) and check_bearer("anything", None)
    assert check_bearer("Bearer tok", "tok") and check_bearer("BEARER  tok ", "tok")
    for header in (None, "", "tok", "Basic tok", "Bearer", "Bearer tok2", "Bearer tök"):
        assert not check_bearer(header, "tok"), header
