"""The engine as the server sees it: the Engine facade and the typed messages it takes and returns. parityrt/server
imports from parityrt.engine through this module only (tests/test_layout.py checks it), so the scheduler, caches
and Sequence can change without touching the server.

Engine's facade: submit(requests), step_outputs(), abort_requests(rids), has_work(), model_info(), stats(),
flush_cache(), weight_version / set_weight_version(version), set_model(model, version), and its tokenizer; for RL
trainers: update_weights(named), weights_by_name, retract_all, release_memory / resume_memory(tags), device.
"""

from parityrt.engine.engine import Engine, EngineStats, ModelInfo, StepOutputs
from parityrt.engine.output import Logprobs, RequestOutput, TokenLogprob, VersionSpan
from parityrt.engine.request import TOP_K_ALL, GenerateRequest, ImageInputs, SamplingParams, compile_stop_regex
from parityrt.engine.weight_update import WeightUpdateError, parse_dtype

__all__ = [
    "TOP_K_ALL", "Engine", "EngineStats", "GenerateRequest", "ImageInputs", "Logprobs", "ModelInfo", "RequestOutput",
    "SamplingParams", "StepOutputs", "TokenLogprob", "VersionSpan", "WeightUpdateError", "compile_stop_regex",
    "parse_dtype",
]
