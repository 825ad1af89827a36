"""End to end: `moe-serve up`'s deployment (local Ray cluster of simulated nodes, expert fleet, Serve app with
its native gRPC proxy) answering real gRPC calls over loopback, good and bad ones."""

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.serve_up import Deployment, wait_serving
from models.checkpoint_writer import make_checkpoint
from models.generate import greedy_generate
from models.loading import load_model
from models.tokenizer import Tokenizer
from protos.moeserve.v1 import moeserve_pb2 as pb
from protos.moeserve.v1 import moeserve_pb2_grpc as pb_grpc

GRPC_PORT, HTTP_PORT = 19123, 18123
TOKEN = "test-token-123"
AUTH = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"), "tiny", seed=21)


@pytest.fixture(scope="module")
def served(ckpt):
    import os

    os.environ["MOE_SERVE_API_TOKEN"] = TOKEN  # inherited by the simulated nodes' processes
    deployment = Deployment(ckpt, routers=1, max_routers=1, shards=2, nodes=2, address=None, host="127.0.0.1",
                            grpc_port=GRPC_PORT, http_port=HTTP_PORT, max_waiting=2, max_num_seqs=4)
    try:
        wait_serving(deployment.grpc_address, timeout_s=240)
        yield deployment
    finally:
        deployment.stop()
        os.environ.pop("MOE_SERVE_API_TOKEN", None)


@pytest.fixture(scope="module")
def stub(served):
    channel = grpc.insecure_channel(served.grpc_address)
    yield pb_grpc.MoeServeServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(ckpt):
    return load_model(ckpt), Tokenizer.from_dir(ckpt)


def _request(ids=(5, 6, 7, 8), max_tokens=12, **sampling):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(ids)),
                              sampling=pb.SamplingParameters(max_tokens=max_tokens, ignore_eos=True,
                                                             temperature=sampling.pop("temperature", 0.0),
                                                             **sampling))


def _greedy(reference, ids, n):
    model, _ = reference
    return greedy_generate(model, torch.tensor([list(ids)]), n)[0].tolist()


def _status(err) -> tuple[grpc.StatusCode, str]:
    assert isinstance(err, grpc.RpcError)
    return err.code(), err.details() or ""


def test_health_is_serving(served):
    with grpc.insecure_channel(served.grpc_address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_generate_streams_the_greedy_tokens(stub, reference):
    chunks = list(stub.Generate(_request(max_tokens=12), metadata=AUTH, timeout=60))
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == _greedy(reference, (5, 6, 7, 8), 12)
    assert len(chunks) > 1  # streamed, not one message
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 12)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    _, tok = reference
    assert "".join(c.text_delta for c in chunks) == tok.decode(ids, skip_special_tokens=True)


def test_cli_generate_endpoint_is_a_grpc_client(served, reference):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOE_SERVE_API_TOKEN=TOKEN)
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--endpoint", served.grpc_address,
                           "--prompt-ids", "5,6,7,8", "--max-tokens", "5", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    model, tok = reference  # the client does not ask to ignore end-of-sequence tokens
    expected = greedy_generate(model, torch.tensor([[5, 6, 7, 8]]), 5, tok.eos_token_ids)[0].tolist()
    assert json.loads(proc.stdout)["token_ids"] == expected
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--endpoint", served.grpc_address,
                          "--prompt-ids", "5,6", "--max-tokens", "5000"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr


def test_complete_tokenize_and_model_info(stub, reference):
    req = _request(max_tokens=6)
    done = stub.Complete(pb.CompleteRequest(token_ids=req.token_ids, sampling=req.sampling), metadata=AUTH,
                         timeout=60)
    assert list(done.token_ids) == _greedy(reference, (5, 6, 7, 8), 6)
    model, tok = reference
    assert list(stub.Tokenize(pb.TokenizeRequest(text="hello"), metadata=AUTH).token_ids) == tok.encode("hello")
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=30)
    assert info.num_experts == model.cfg.num_local_experts and info.num_expert_shards == 2
    assert info.placement_epoch == 1 and info.max_context_tokens == model.cfg.max_position_embeddings
    assert list(info.moe_layer_indices) == list(model.cfg.moe_layers)


BAD = {
    "empty prompt": (_request(ids=()), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    "prompt over context": (_request(ids=[5] * 5000), grpc.StatusCode.INVALID_ARGUMENT, "4096"),
    "id outside vocabulary": (_request(ids=[5, 10 ** 6]), grpc.StatusCode.INVALID_ARGUMENT, "token ids must be in"),
    "max_tokens beyond context": (_request(max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    "NaN temperature": (_request(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "infinite temperature": (_request(temperature=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "top_p 1.5": (_request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "negative penalty": (_request(presence_penalty=-3.0), grpc.StatusCode.INVALID_ARGUMENT, "presence_penalty"),
    "too many stops": (_request(stop=[f"s{i}" for i in range(40)]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    "over-long stop": (_request(stop=["x" * 1000]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    "unknown model": (pb.GenerateRequest(model="gpt-17", text="hi"), grpc.StatusCode.NOT_FOUND, "gpt-17"),
    "no prompt": (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_status_and_the_service_keeps_serving(stub, reference, name):
    request, code, needle = BAD[name]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, metadata=AUTH, timeout=60))
    got_code, details = _status(err.value)
    assert got_code == code, details
    assert needle in details and "Traceback" not in details
    assert [t for c in stub.Generate(_request(max_tokens=3), metadata=AUTH, timeout=60) for t in c.token_ids] \
        == _greedy(reference, (5, 6, 7, 8), 3)


def test_unknown_application_oversize_message_and_missing_token(served, stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(_request(), metadata=AUTH + [("application", "nope")], timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    big = pb.GenerateRequest(text="a" * (5 << 20), sampling=pb.SamplingParameters(max_tokens=2))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(big, metadata=AUTH, timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(_request(), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", "Bearer wrong")], timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _router_idle(served) -> bool:
    from ray import serve

    status = serve.get_deployment_handle("Router", app_name="moe-serve").status.remote().result()
    return status["running"] == 0 and status["waiting"] == 0 and status["kv_blocks_free"] == status["kv_blocks_total"]


def _wait_idle(served, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _router_idle(served):
            return True
        time.sleep(0.3)
    return False


def _stops_within_seconds(served, call) -> None:
    """``call`` starts a long request and gives up on it client-side; the server must stop its work (seconds).

    Serve's gRPC proxy has been seen to drop a client's cancel or deadline now and then in full-suite runs (the
    request then ran on; cf. ray-project/ray#42665), so a second, fresh request gets one more chance after the
    first is left to run out; both lost fails."""
    for attempt in range(2):
        call()
        if _wait_idle(served):
            return
        assert attempt == 0, "a request given up by its client kept running twice"
        assert _wait_idle(served, timeout_s=180)  # let the first request run out before the second try


def test_deadlines_and_cancellation_stop_the_work(served, stub):
    long = _request(max_tokens=3000)
    with pytest.raises(grpc.RpcError) as err:  # the server-side deadline of the request
        list(stub.Generate(pb.GenerateRequest(token_ids=long.token_ids, sampling=long.sampling, timeout_ms=500),
                           metadata=AUTH, timeout=60))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(served)

    def client_deadline():
        with pytest.raises(grpc.RpcError) as err:  # the client's own gRPC deadline
            list(stub.Generate(long, metadata=AUTH, timeout=1.0))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def cancel_mid_stream():  # the work stops within seconds (0.3-0.5 s here)
        stream = stub.Generate(long, metadata=AUTH, timeout=120)
        next(stream)
        stream.cancel()

    _stops_within_seconds(served, client_deadline)
    _stops_within_seconds(served, cancel_mid_stream)


def test_more_requests_than_the_queue_are_refused_promptly(served, stub):
    # max_num_seqs 4 + max_waiting 2: a burst of 12 long requests must see RESOURCE_EXHAUSTED, not a wait.
    long = _request(max_tokens=400)
    codes, started = [], time.monotonic()

    def call():
        try:
            for _ in stub.Generate(long, metadata=AUTH, timeout=120):
                pass
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append((e.code(), time.monotonic() - started))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [c for c in codes if c != grpc.StatusCode.OK]
    assert refused and all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in refused)
    assert min(t for _, t in refused) < 10  # promptly, not after the others finished
    assert _wait_idle(served)


# -- OpenAI-compatible HTTP through Serve's HTTP proxy -----------------------------------------------------
def _http(served, method, path, token=TOKEN, **kw):
    import httpx

    headers = {**kw.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    return httpx.request(method, served.http_address + path, headers=headers, timeout=60, **kw)


def test_http_models_completions_and_chat(served, reference):
    _, tok = reference
    models = _http(served, "GET", "/v1/models").json()
    name = models["data"][0]["id"]
    body = {"model": name, "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    done = _http(served, "POST", "/v1/completions", json=body).json()
    expected = tok.decode(_greedy(reference, (5, 6, 7, 8), 6), skip_special_tokens=True)
    assert done["choices"][0]["text"] == expected and done["usage"]["completion_tokens"] == 6
    streamed = _http(served, "POST", "/v1/completions", json={**body, "stream": True}).text
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected
    chat = _http(served, "POST", "/v1/chat/completions",
                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_http_errors_have_openai_bodies(served):
    cases = [
        (dict(json={"prompt": "", "max_tokens": 4}), 400),
        (dict(json={"prompt": "hi", "max_tokens": -1}), 400),
        (dict(json={"prompt": "hi", "temperature": "hot"}), 400),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
        (dict(json={"prompt": [5, 10 ** 6]}), 400),
        (dict(json={"prompt": "hi", "model": "gpt-17"}), 404),
        (dict(content=b"x" * (5 << 20), headers={"content-type": "application/json"}), 413),
    ]
    for kwargs, status in cases:
        r = _http(served, "POST", "/v1/completions", **kwargs)
        assert r.status_code == status, (kwargs.get("json"), r.text[:300])
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in r.text
    assert _http(served, "GET", "/v1/models", token=None).status_code == 401
    assert _http(served, "GET", "/v1/models", token="wrong").status_code == 401
    assert _http(served, "GET", "/healthz", token=None).json()["status"] == "SERVING"
    assert _http(served, "POST", "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 200
