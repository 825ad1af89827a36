"""A small gRPC client of ``moeserve.v1`` (``moe-serve generate --endpoint``)."""

from __future__ import annotations

import json
import os
from typing import TextIO

import grpc

from protos.moeserve.v1 import moeserve_pb2 as pb
from protos.moeserve.v1 import moeserve_pb2_grpc as pb_grpc


def _metadata() -> list[tuple[str, str]]:
    token = os.environ.get("MOE_SERVE_API_TOKEN")
    return [("authorization", f"Bearer {token}")] if token else []


def stream_generate(endpoint: str, prompt: str | list[int], max_tokens: int, out: TextIO,
                    as_json: bool = False, temperature: float = 0.0) -> list[int]:
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(temperature=temperature, max_tokens=max_tokens))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    ids: list[int] = []
    text = []
    with grpc.insecure_channel(endpoint) as channel:
        for chunk in pb_grpc.MoeServeServiceStub(channel).Generate(request, metadata=_metadata(), timeout=300):
            ids += chunk.token_ids
            text.append(chunk.text_delta)
            if not as_json:
                out.write(chunk.text_delta)
                out.flush()
    out.write(json.dumps({"token_ids": ids, "text": "".join(text)}) + "\n" if as_json else "\n")
    return ids
