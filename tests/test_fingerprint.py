"""The numerics contract (issue 13, item 3): stable across loads, changed by any knob (and the diff names it),
served by the live server, written into run directories, refused on a weight update that changes it."""

from __future__ import annotations

import copy
import dataclasses
import urllib.error

import pytest

from hf_reference import tiny_model_config
from parityrt.config import compose_run, load_preset
from parityrt.fingerprint import (
    FILE_NAME,
    FingerprintMismatch,
    check_fingerprint,
    check_server_fingerprint,
    diff_fingerprints,
    fetch_fingerprint,
    fingerprint_hash,
    numerics_fingerprint,
    read_fingerprint,
)
from parityrt.numerics import LayerOverride, bind, with_ops
from parityrt.runtime import load_runtime, run_fingerprint, write_run_files
from parityrt.weights import build_model, ensure_generated_checkpoint
from server_utils import live_server

KEY = "sk-fingerprint"


@pytest.fixture(scope="module")
def overrides(cache_dir) -> list[str]:
    return [f"model.cache_dir={cache_dir}", "numerics=rl_parity", "engine.max_seq_len=256"]


@pytest.fixture(scope="module")
def base(overrides) -> dict:
    run = compose_run(overrides)
    return load_runtime(run).fingerprint


@pytest.fixture(scope="module")
def model(cache_dir):
    return build_model(tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)))[0]


def _fp(model, policy, **kw) -> dict:
    return numerics_fingerprint(model, bind(model, policy), policy=policy, dtype="bfloat16", device="cpu", **kw)


def test_stable_across_loads_and_complete(overrides, base) -> None:
    again = load_runtime(compose_run(overrides)).fingerprint
    assert again == base and diff_fingerprints(base, again) == []
    assert base["name"] == "rl_parity" and len(base["hash"]) == 16 and base["hash"] == fingerprint_hash(base)
    assert {"policy", "process", "model", "parallel", "versions", "device"} <= set(base)
    assert base["policy"]["layers.0.mlp.experts"]["combine"] == "index_add_bf16" and base["policy"]["rotary"]["op"] == "rope"
    assert base["process"] == {"deterministic": True, "shape_stable": True}
    assert base["model"]["architecture"] == "Qwen35MoeArgs" and base["model"]["dtype"] == "bfloat16"
    assert base["model"]["args"]["hidden_size"] == 256 and base["parallel"] == {"tp_size": 1}
    assert set(base["versions"]) >= {"torch", "triton", "transformers", "parityrt"} and base["versions"]["torch"]
    assert base["device"]["type"] == "cpu" and base["device"]["name"]


def test_model_args_and_hf_config_give_the_same_section(model, cache_dir) -> None:
    policy = load_preset("rl_parity")
    table = bind(model, policy)
    cfg = tiny_model_config("qwen3_5_moe_tiny", cache_dir=str(cache_dir)).hf_config
    fps = [numerics_fingerprint(m, table, policy=policy, dtype="bfloat16", device="cpu") for m in (model, model.args, cfg)]
    assert fps[0] == fps[1] == fps[2]


def test_the_name_is_carried_not_hashed(model) -> None:
    policy = load_preset("rl_parity")
    renamed = _fp(model, dataclasses.replace(policy, name="my_copy"))
    assert renamed["hash"] == _fp(model, policy)["hash"] and renamed["name"] == "my_copy"


def test_one_knob_changes_the_hash_and_the_diff_names_every_module(model) -> None:
    policy = load_preset("rl_parity")
    a, b = _fp(model, policy), _fp(model, with_ops(policy, experts={"combine": "fp32_sum"}))
    assert a["hash"] != b["hash"]
    assert diff_fingerprints(a, b) == [f"policy layers.{i}.mlp.experts.combine: index_add_bf16 != fp32_sum" for i in range(4)]
    one = dataclasses.replace(policy, overrides=[LayerOverride(pattern="layers.3.*", op="experts", set={"combine": "fp32_sum"})])
    assert diff_fingerprints(a, _fp(model, one)) == ["policy layers.3.mlp.experts.combine: index_add_bf16 != fp32_sum"]
    # every rope module carries the knob (one RopeNumerics), though only the table module reads it
    assert diff_fingerprints(a, _fp(model, with_ops(policy, rope={"table_dtype": "bf16"}))) == [
        "policy layers.3.self_attn.rope.table_dtype: fp32 != bf16", "policy rotary.table_dtype: fp32 != bf16"]


def test_the_other_sections_are_named_too(model, base) -> None:
    policy = load_preset("rl_parity")
    a = _fp(model, policy)
    tp2 = _fp(model, policy, tp_size=2, virtual=True)
    assert diff_fingerprints(a, tp2) == ["parallel.tp_size: 1 != 2", "parallel.virtual: (absent) != true"]
    fp32 = numerics_fingerprint(model, bind(model, policy), policy=policy, dtype="float32", device="cpu")
    assert diff_fingerprints(a, fp32) == ["model.dtype: bfloat16 != float32"]
    other = copy.deepcopy(a)
    other["versions"]["torch"], other["device"]["name"] = "2.11.0", "NVIDIA H200"
    other["process"]["shape_stable"], other["model"]["args"]["rms_norm_eps"] = False, 1e-5
    assert diff_fingerprints(a, other) == [
        "process.shape_stable: true != false", "model.args.rms_norm_eps: 1e-06 != 1e-05",
        f"versions.torch: {a['versions']['torch']} != 2.11.0", f"device.name: {a['device']['name']} != NVIDIA H200"]
    with pytest.raises(FingerprintMismatch, match="in 4 places") as e:
        check_fingerprint(a, other, what="the server")
    assert e.value.differences == diff_fingerprints(a, other)


@pytest.fixture(scope="module")
def srv(overrides):
    with live_server(overrides, api_key=KEY) as s:
        yield s


def test_served_in_server_info_and_model_info(srv, base) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for route in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        assert srv.get(route, headers=headers).json()["numerics_fingerprint"] == base, route
    assert fetch_fingerprint(srv.url, api_key=KEY) == base
    with pytest.raises(urllib.error.HTTPError, match="401"):
        fetch_fingerprint(srv.url)


def test_a_trainer_checks_the_server(srv, base, model) -> None:
    """What the trainer does at start: its own fingerprint (same checkpoint, policy, dtype, device) against the
    served one; a different knob is refused, naming it."""
    assert check_server_fingerprint(srv.url, base, api_key=KEY) == base
    policy = with_ops(load_preset("rl_parity"), lm_head={"dtype": "fp32"})
    mine = _fp(model, policy)
    with pytest.raises(FingerprintMismatch, match=r"server at http://127\.0\.0\.1:\d+.*\n  policy lm_head\.dtype: fp32 != native$"):
        check_server_fingerprint(srv.url, mine, api_key=KEY)


def test_a_train_model_checks_the_server(srv, base) -> None:
    """parityrt/train's TrainModel on the served checkpoint and policy is the same contract, so check_server
    passes, also while it replays the server's routing (router.replay decides no bit of the contract); another
    knob is refused, naming it."""
    from parityrt.train.model import TrainModel

    train = TrainModel.from_pretrained(srv.state.model_path, "rl_parity")
    assert train.fingerprint()["hash"] == base["hash"]
    assert train.check_server(srv.url, api_key=KEY)["hash"] == base["hash"]
    replaying = TrainModel.from_pretrained(srv.state.model_path, with_ops(load_preset("rl_parity"), router={"replay": True}))
    assert any(t.get("replay") for t in replaying.table.values())
    assert replaying.check_server(srv.url, api_key=KEY)["hash"] == base["hash"]
    other = TrainModel.from_pretrained(srv.state.model_path, with_ops(load_preset("rl_parity"), experts={"combine": "fp32_sum"}))
    with pytest.raises(FingerprintMismatch, match=r"policy layers\.0\.mlp\.experts\.combine: fp32_sum != "):
        other.check_server(srv.url, api_key=KEY)


def test_a_weight_update_keeps_the_contract(srv, cache_dir) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    other_cfg = compose_run([f"model.cache_dir={cache_dir}", "model.hf_config.rms_norm_eps=1e-5"]).model
    other = ensure_generated_checkpoint(other_cfg)
    r = srv.post("/update_weights_from_disk", {"model_path": str(other)}, headers=headers)
    assert r.status_code == 400 and r.json()["success"] is False
    assert "model.args.rms_norm_eps: 1e-06 != 1e-05" in r.json()["message"]
    assert srv.get("/server_info", headers=headers).json()["weight_version"] == "default"


def test_written_into_the_run_directory(overrides, tmp_path) -> None:
    run = compose_run(overrides)
    rt = load_runtime(run)
    write_run_files(tmp_path, run, rt)
    assert (tmp_path / FILE_NAME).is_file() and read_fingerprint(tmp_path) == rt.fingerprint
    assert read_fingerprint(tmp_path / FILE_NAME) == run_fingerprint(run, rt.model, rt.numerics_table)
