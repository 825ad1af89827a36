"""The public proto: stubs reproducible from the .proto, messages round-trip, every element documented,
and the generated servicer answers over a real gRPC server on loopback."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from protos import generate as gen
from protos.moeserve.v1 import moeserve_pb2 as pb
from protos.moeserve.v1 import moeserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "moeserve" / "v1" / "moeserve.proto"
SERVICER_PATH = "protos.moeserve.v1.moeserve_pb2_grpc.add_MoeServeServiceServicer_to_server"


# ----------------------------------------------------------------------------- (a) reproducible stubs


def test_regenerated_stubs_are_byte_identical(tmp_path):
    written = gen.generate(tmp_path)
    assert written, "no .proto found under protos/"
    for path in written:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is not committed; run protos/generate.sh"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale (or grpcio-tools differs from the pinned one); "
            "run protos/generate.sh")
    generated = {p.relative_to(tmp_path) for p in written}
    committed_stubs = {p.relative_to(ROOT) for p in (ROOT / "protos").rglob("*_pb2*.py*")}
    assert committed_stubs == generated, "stubs committed without a .proto; delete them"


def test_stubs_import_without_warnings():
    # Fresh interpreter: a gencode/runtime version skew shows up as a warning (or error) at import.
    code = f"import importlib; importlib.import_module({SERVICER_PATH.rsplit('.', 1)[0]!r})"
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- (b) round trip


def _round_trip(msg):
    again = type(msg).FromString(msg.SerializeToString())
    assert again == msg
    return again


def test_prompt_oneof_round_trips():
    by_text = _round_trip(pb.GenerateRequest(request_id="r1", text="hello"))
    assert by_text.WhichOneof("prompt") == "text" and by_text.text == "hello"
    by_ids = _round_trip(pb.CompleteRequest(token_ids=pb.TokenIds(ids=[1, 2, 202047])))
    assert by_ids.WhichOneof("prompt") == "token_ids" and list(by_ids.token_ids.ids) == [1, 2, 202047]
    by_ids.text = "now text"  # setting one member clears the other
    assert by_ids.WhichOneof("prompt") == "text" and not by_ids.HasField("token_ids")
    assert pb.GenerateRequest().WhichOneof("prompt") is None


def test_unset_temperature_differs_from_explicit_zero():
    unset = _round_trip(pb.GenerateRequest(text="x", sampling=pb.SamplingParameters(max_tokens=8)))
    greedy = _round_trip(pb.GenerateRequest(text="x", sampling=pb.SamplingParameters(temperature=0.0)))
    assert not unset.sampling.HasField("temperature") and unset.sampling.temperature == 0.0
    assert greedy.sampling.HasField("temperature") and greedy.sampling.temperature == 0.0
    assert greedy.SerializeToString() != unset.SerializeToString()
    seeded = _round_trip(pb.SamplingParameters(seed=0))  # seed 0 is a real seed, not "unset"
    assert seeded.HasField("seed") and not pb.SamplingParameters().HasField("seed")


def test_full_messages_round_trip():
    params = pb.SamplingParameters(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
        frequency_penalty=-0.5, seed=2**63 - 1, max_tokens=128, stop=["\n\n", "END"], stop_token_ids=[7, 8],
        ignore_eos=True, top_logprobs=5)
    assert _round_trip(params).seed == 2**63 - 1
    chunk = _round_trip(pb.GenerateResponse(
        request_id="r1", token_ids=[5, 6], text_delta="ab", logprobs=[-0.25, -1.5],
        top_logprobs=[pb.TopLogprobs(token_ids=[5, 9], logprobs=[-0.25, -2.0])] * 2,
        finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=3, completion_tokens=2)))
    assert chunk.finish_reason == pb.FinishReason.Value("FINISH_REASON_LENGTH")
    assert list(chunk.logprobs) == [-0.25, -1.5]  # dyadic values survive float32 exactly
    tok = _round_trip(pb.TokenizeRequest(text="hi", add_bos=False))
    assert tok.HasField("add_bos") and not pb.TokenizeRequest(text="hi").HasField("add_bos")
    info = _round_trip(pb.GetModelInfoResponse(model_name="tiny", moe_layer_indices=[1, 3], placement_epoch=2**40))
    assert list(info.moe_layer_indices) == [1, 3] and info.placement_epoch == 2**40


# ----------------------------------------------------------------------------- (c) documented, Buf style

_DECL = re.compile(r"^(message|enum|service|oneof)\s+(\w+)\s*\{\s*\}?$")
_RPC = re.compile(r"^rpc\s+(\w+)\s*\(")
_FIELD = re.compile(r"^(?:(?:optional|repeated)\s+)?(?:map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*(?:\[.*\])?\s*;$")
_ENUM_VALUE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(-?\d+)\s*(?:\[.*\])?\s*;$")
_NEED_NO_DOC = re.compile(r"^(syntax|reserved|option|import)\b|^\}$")


def _screaming_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def _parse(text: str):
    """(undocumented line numbers, {kind: [names]}, {enum: [(value name, number)]})."""
    undocumented, seen, enums = [], {"message": [], "enum": [], "service": [], "oneof": [], "rpc": [],
                                      "field": [], "value": []}, {}
    previous, stack = "", []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("//"):
            previous = line  # a blank line detaches a comment, as protoc treats it
            continue
        if m := _DECL.match(line):
            kind, name = m.groups()
            seen[kind].append(name)
            if kind == "enum":
                enums[name] = []
            if not line.endswith("}"):
                stack.append((kind, name))
        elif m := _RPC.match(line):
            kind = "rpc"
            seen[kind].append(m.group(1))
        elif stack and stack[-1][0] == "enum" and (m := _ENUM_VALUE.match(line)):
            kind = "value"
            seen[kind].append(m.group(1))
            enums[stack[-1][1]].append((m.group(1), int(m.group(2))))
        elif (m := _FIELD.match(line)) and stack and stack[-1][0] in ("message", "oneof"):
            kind = "field"
            seen[kind].append(m.group(1))
        elif m := _NEED_NO_DOC.match(line):
            kind = None
            if line == "}":
                stack.pop()
        elif line.startswith("package "):
            kind = "package"
        else:
            raise AssertionError(f"moeserve.proto:{number}: the simple parser cannot read {line!r}")
        if kind and not previous.startswith("//"):
            undocumented.append(f"{number}: {line}")
        previous = line
    return undocumented, seen, enums


def test_every_element_has_a_comment():
    undocumented, seen, _ = _parse(PROTO.read_text())
    assert not undocumented, "lines without a // comment line above:\n" + "\n".join(undocumented)
    # The parser must have seen everything the compiler did.
    d = pb.DESCRIPTOR
    all_fields = [f.name for m in d.message_types_by_name.values() for f in m.fields]
    assert sorted(seen["message"]) == sorted(d.message_types_by_name)
    assert sorted(seen["enum"]) == sorted(d.enum_types_by_name)
    assert sorted(seen["rpc"]) == sorted(d.services_by_name["MoeServeService"].methods_by_name)
    assert sorted(seen["field"]) == sorted(all_fields)


def test_enums_start_with_unspecified_zero_and_are_prefixed():
    _, _, enums = _parse(PROTO.read_text())
    assert enums, "no enum parsed"
    for name, values in enums.items():
        prefix = _screaming_snake(name) + "_"
        assert values[0] == (prefix + "UNSPECIFIED", 0), f"{name}: first value must be {prefix}UNSPECIFIED = 0"
        assert all(v.startswith(prefix) for v, _ in values), f"{name}: every value must start with {prefix}"


def test_finish_reasons_cover_the_engine():
    # router/request.py GenerationOutput.finish_reason: "stop", "length", "abort", "deadline", "error".
    for reason in ("stop", "length", "abort", "deadline", "error"):
        assert pb.FinishReason.Value(f"FINISH_REASON_{reason.upper()}") > 0


def test_units_are_in_field_names():
    fields = {f.name for m in pb.DESCRIPTOR.message_types_by_name.values() for f in m.fields}
    assert {"max_tokens", "max_context_tokens", "prompt_tokens", "completion_tokens", "timeout_ms"} <= fields
    assert not {"timeout", "deadline", "max_context", "context_length"} & fields


# ----------------------------------------------------------------------------- (d) real gRPC server


def _import_attr(path: str):
    """Resolve 'pkg.module.attr' as Ray Serve's proxy does for grpc_servicer_functions."""
    module, attr = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


class _TinyServicer(pb_grpc.MoeServeServiceServicer):
    def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(model_name="tiny", max_context_tokens=256, vocab_size=512, num_layers=4,
                                       num_experts=4, experts_per_token=1, moe_layer_indices=[1, 3],
                                       placement_epoch=1, num_expert_shards=2, num_router_replicas=1,
                                       dtype="float32")

    def Generate(self, request, context):
        ids = list(request.token_ids.ids)  # echo the prompt back, one token per message
        for i, tok in enumerate(ids):
            last = i == len(ids) - 1
            yield pb.GenerateResponse(
                request_id=request.request_id, token_ids=[tok], text_delta=f"<{tok}>", logprobs=[-float(i)],
                finish_reason=pb.FINISH_REASON_STOP if last else pb.FINISH_REASON_UNSPECIFIED,
                usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=len(ids)) if last else None)


@pytest.fixture
def stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    _import_attr(SERVICER_PATH)(_TinyServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.MoeServeServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_servicer_path_is_importable():
    assert _import_attr(SERVICER_PATH) is pb_grpc.add_MoeServeServiceServicer_to_server


def test_get_model_info_over_loopback(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.model_name, info.num_experts, list(info.moe_layer_indices)) == ("tiny", 4, [1, 3])


def test_generate_streams_over_loopback(stub):
    request = pb.GenerateRequest(request_id="r7", token_ids=pb.TokenIds(ids=[11, 12, 13]),
                                 sampling=pb.SamplingParameters(temperature=0.0, max_tokens=3))
    chunks = list(stub.Generate(request, timeout=10))
    assert [list(c.token_ids) for c in chunks] == [[11], [12], [13]]
    assert "".join(c.text_delta for c in chunks) == "<11><12><13>"
    assert [c.finish_reason for c in chunks] == [pb.FINISH_REASON_UNSPECIFIED] * 2 + [pb.FINISH_REASON_STOP]
    assert not chunks[0].HasField("usage") and chunks[-1].usage.completion_tokens == 3
    assert {c.request_id for c in chunks} == {"r7"}


def test_unimplemented_rpc_is_a_status(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(pb.TokenizeRequest(text="hi"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
