"""Between the versioned protobuf API (``protos/moeserve/v1``) and the engine's own types, and from engine
errors to gRPC status codes. Protobuf stops here: nothing past the ingress sees it."""

from __future__ import annotations

import time
import uuid

import grpc

from protos.moeserve.v1 import moeserve_pb2 as pb
from router.request import EngineError, GenerationOutput, GenerationRequest, InvalidRequestError, OverloadedError
from router.sampling import SamplingParams, SamplingParamsError

DEFAULT_MAX_TOKENS = 16

FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                  "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
                  "deadline": pb.FINISH_REASON_DEADLINE, "error": pb.FINISH_REASON_ERROR}


class ApiError(Exception):
    """An error with the gRPC status it maps to and a message for a person (never a stack trace)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)  # both in args, so it pickles across Ray processes
        self.code, self.message = code, message


def status_of(error: BaseException) -> ApiError:
    error = getattr(error, "cause", None) or error  # unwrap Ray's task error around a replica's exception
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (InvalidRequestError, SamplingParamsError)):
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, OverloadedError):
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, EngineError):
        return ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    if type(error).__name__ == "BackPressureError":
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded: too many requests queued; retry later")
    return ApiError(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); the server keeps serving")


def sampling_params(sp: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields take the engine's defaults; out-of-range values raise SamplingParamsError."""
    return SamplingParams(
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_k=sp.top_k, top_p=sp.top_p if sp.HasField("top_p") else 1.0, min_p=sp.min_p,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        seed=sp.seed if sp.HasField("seed") else None, max_tokens=sp.max_tokens or DEFAULT_MAX_TOKENS,
        stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
        logprobs=sp.top_logprobs or None)


def engine_request(req, tokenizer, model_name: str) -> GenerationRequest:
    """A ``GenerateRequest`` / ``CompleteRequest`` as the engine's request (validated on the way)."""
    if req.model and req.model != model_name:
        raise ApiError(grpc.StatusCode.NOT_FOUND, f"model {req.model!r} is not served here; this server serves "
                                                  f"{model_name!r}")
    which = req.WhichOneof("prompt")
    if which is None:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set `text` or `token_ids`")
    ids = tuple(tokenizer.encode(req.text)) if which == "text" else tuple(req.token_ids.ids)
    if which == "text" and not req.text:
        ids = ()
    deadline = time.monotonic() + req.timeout_ms / 1000 if req.timeout_ms else None
    return GenerationRequest(request_id=req.request_id or f"gen-{uuid.uuid4().hex}", prompt_ids=ids,
                             params=sampling_params(req.sampling), deadline=deadline)


def _top(out: GenerationOutput) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
            for top in out.top_logprobs if top is not None]


def generate_response(out: GenerationOutput) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=out.request_id, token_ids=out.token_ids, text_delta=out.text_delta, logprobs=out.logprobs,
        top_logprobs=_top(out), finish_reason=FINISH_REASONS[out.finish_reason],
        usage=pb.Usage(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens),
        error_message=out.error or "")


def complete_response(outputs: list[GenerationOutput]) -> pb.CompleteResponse:
    last = outputs[-1]
    return pb.CompleteResponse(
        request_id=last.request_id, text="".join(o.text_delta for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids], logprobs=[lp for o in outputs for lp in o.logprobs],
        top_logprobs=[t for o in outputs for t in _top(o)], finish_reason=FINISH_REASONS[last.finish_reason],
        usage=pb.Usage(prompt_tokens=last.usage.prompt_tokens, completion_tokens=last.usage.completion_tokens),
        error_message=last.error or "")
