"""The route bodies FastAPI parses first (as SGLang's dataclass and pydantic models do, so malformed bodies get
FastAPI's validation errors, rewritten to SGLang's 400) and SGLang's ErrorResponse."""

from __future__ import annotations

from typing import Any, Optional, Union

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
