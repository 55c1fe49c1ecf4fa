"""The route bodies FastAPI parses first (as SGLang's dataclass and pydantic models do, so malformed bodies get
FastAPI's validation errors, rewritten to SGLang's 400) and SGLang's ErrorResponse."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr


class GenerateReqInput(BaseModel):
    """The typed view of a /generate body (SGLang's GenerateReqInput types; unknown keys are ignored)."""

    model_config = ConfigDict(extra="ignore")
    rid: Optional[Union[str, list[str]]] = None
    text: Optional[Union[list[str], str]] = None
    input_ids: Optional[Union[list[list[int]], list[int]]] = None
    sampling_params: Optional[Union[list[dict[str, Any]], dict[str, Any]]] = None
    return_logprob: Optional[Union[list[bool], bool]] = None
    logprob_start_len: Optional[Union[list[int], int]] = None
    top_logprobs_num: Optional[Union[list[int], int]] = None
    token_ids_logprob: Optional[Union[list[list[int]], list[int]]] = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    return_routed_experts: bool = False
    return_prompt_token_ids: bool = False


class UpdateWeightVersionReq(BaseModel):
    """SGLang's UpdateWeightVersionReqInput: a string version is required ({} and 5 are 400s, not "None"/"5")."""

    new_version: StrictStr
    abort_all_requests: StrictBool = True  # SGLang's default: running requests end with an abort first


class AbortReq(BaseModel):
    rid: str = ""
    abort_all: bool = False


class UpdateWeightsReq(BaseModel):
    model_path: str
    load_format: Optional[str] = None
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    flush_cache: bool = True


def error_object(message: str, type_: str, code: int) -> dict[str, Any]:
    """SGLang's ErrorResponse (validation errors, OpenAI routes, HTTP exceptions)."""
    return {"object": "error", "message": message, "type": type_, "param": None, "code": code}


# ---- the routes RL frameworks drive (parityrt/server/control.py), SGLang 0.5.23's io_struct -------------------


class InitWeightsUpdateGroupReq(BaseModel):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class DestroyWeightsUpdateGroupReq(BaseModel):
    group_name: str = "weight_update_group"


class UpdateWeightsFromDistributedReq(BaseModel):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    load_format: Optional[str] = None
    torch_empty_cache: bool = False


class UpdateWeightsFromTensorReq(BaseModel):
    serialized_named_tensors: list[str]  # base64, one payload per TP rank
    load_format: Optional[str] = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    disable_draft_model: Optional[bool] = None
    torch_empty_cache: bool = False


class GetWeightsByNameReq(BaseModel):
    name: str
    truncate_size: int = 100


class PauseGenerationReq(BaseModel):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReq(BaseModel):
    torch_empty_cache: bool = True


class MemoryOccupationReq(BaseModel):
    tags: Optional[list[str]] = None  # None: every tag


class TokenizeReq(BaseModel):
    """SGLang's TokenizeRequest (srt/entrypoints/openai/protocol.py)."""

    model: Optional[str] = None
    prompt: Union[str, list[str]]
    add_special_tokens: bool = True


class DetokenizeReq(BaseModel):
    model: Optional[str] = None
    tokens: Union[list[int], list[list[int]]]
    skip_special_tokens: bool = True
