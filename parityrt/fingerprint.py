"""The numerics contract: a named, hashed fingerprint of everything that decides a forward's bits.

Two processes (a server and a trainer, two servers, a run and its replay) compute the same bits for the same
inputs and weights only if they agree on all of:
  policy    the resolved table `bind()` returned: {module name: {"op", knobs...}}, overrides and `impl: auto`
            already resolved (the all-reduce knobs are its `all_reduce` modules)
  process   the policy-wide switches that are no module's: deterministic, shape_stable
  model     the parsed model config (the architecture's args, as built from config.json) and the compute dtype
  parallel  tp_size; above 1 also virtual and, for real ranks, the collective backend
  versions  torch (and its CUDA), triton, transformers, parityrt (flashinfer when the policy runs it)
  device    cpu or cuda, the CPU model (and torch's CPU kernel level) or the CUDA device name

    fp = numerics_fingerprint(model, table, policy=policy, dtype="bfloat16", device="cpu")
    fp["hash"]                                  # sha256 (16 hex) of the canonical JSON of the sections above
    diff_fingerprints(fp, fetch_fingerprint("http://127.0.0.1:30000"))  # [] when they agree
    check_server_fingerprint("http://127.0.0.1:30000", fp)              # raises FingerprintMismatch otherwise

The policy's name is carried but not hashed: two policies that resolve to the same table are the same contract.
The server computes its fingerprint once at load (parityrt/runtime.py) and serves it as `numerics_fingerprint`
in /server_info and /model_info; every run directory holds it as numerics_fingerprint.json. Weights are not part
of it (they have the weight version).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from parityrt.numerics import NumericsPolicy, to_jsonable

SCHEMA = 1  # hashed: a change of what goes into the fingerprint changes every hash
FILE_NAME = "numerics_fingerprint.json"
SECTIONS = ("schema", "policy", "process", "model", "parallel", "versions", "device")
# Knobs that decide no bit of the contract's forward. router.replay makes a trainer take the server's own expert
# choices (R3): it exists to match a server that does not replay, so a trainer replaying and a server not
# replaying are one contract.
NOT_CONTRACT = {"router": {"replay"}}


class FingerprintMismatch(ValueError):
    """Two fingerprints disagree; `differences` names every differing knob (diff_fingerprints' lines)."""

    def __init__(self, what: str, differences: list[str]):
        self.differences = differences
        super().__init__(f"the numerics contract differs from {what}'s in {len(differences)} place"
                         f"{'s' if len(differences) != 1 else ''} (ours != theirs):\n  " + "\n  ".join(differences))


def numerics_fingerprint(model: Any, table: dict[str, dict[str, Any]], *, policy: NumericsPolicy,
                         dtype: str | torch.dtype, device: str | torch.device, tp_size: int = 1,
                         virtual: bool = False, backend: str = "auto") -> dict[str, Any]:
    """The fingerprint of `model` bound to `policy` (`table` is what bind() returned). `model`: a parityrt model
    (or anything with `.args`), its args dataclass, or the HF config dict it was built from; all three give the
    same section. dtype: the compute dtype (under FSDP2 the mixed-precision param dtype, not the fp32 masters')."""
    device = str(device)
    tp = {"tp_size": tp_size}
    if tp_size > 1:  # one rank reduces nothing: virtual and backend change no bit at TP = 1
        tp["virtual"] = virtual
        if not virtual:
            tp["backend"] = backend if backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    body = {
        "schema": SCHEMA,
        "policy": policy_section(table),
        "process": {"deterministic": policy.deterministic, "shape_stable": policy.shape_stable},
        "model": model_section(model, dtype),
        "parallel": tp,
        "versions": versions(uses_flashinfer=any(t.get("impl") == "flashinfer" for t in table.values())),
        "device": device_section(device),
    }
    return {"name": policy.name, "hash": fingerprint_hash(body), **body}


def policy_section(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The bound table as JSON, without the knobs that decide no bit (NOT_CONTRACT)."""
    out = to_jsonable(table)
    for entry in out.values():
        for knob in NOT_CONTRACT.get(entry.get("op"), ()):
            entry.pop(knob, None)
    return out


def fingerprint_hash(fp: dict[str, Any]) -> str:
    """sha256 (16 hex digits) over the canonical JSON (sorted keys, no spaces) of the hashed sections."""
    canonical = json.dumps({k: fp.get(k) for k in SECTIONS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_section(model: Any, dtype: str | torch.dtype) -> dict[str, Any]:
    if isinstance(model, dict):  # an HF config: parse it as the loader does, so it reads like the built model's
        from parityrt.weights import architecture  # weights imports the models, which import the layers

        args = architecture(model, Path("<config>"))[1].from_hf(model)
    else:
        args = getattr(model, "args", model)
    if not dataclasses.is_dataclass(args):
        raise TypeError(f"numerics_fingerprint needs a parityrt model, its args or an HF config dict, got {type(model).__name__}")
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    return {"architecture": type(args).__name__, "dtype": name, "args": to_jsonable(dataclasses.asdict(args))}


def versions(uses_flashinfer: bool = False) -> dict[str, str | None]:
    def dist(name: str) -> str | None:  # metadata, not import: importing transformers alone takes seconds
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": dist("triton"),
           "transformers": dist("transformers"), "parityrt": dist("parityrt")}
    if uses_flashinfer:
        out["flashinfer"] = dist("flashinfer-python")
    return out


def device_section(device: str) -> dict[str, str]:
    if device.startswith("cuda"):
        return {"type": "cuda", "name": torch.cuda.get_device_name(torch.device(device))}
    # the CPU kernel level torch dispatches to (AVX2, AVX512, ...) picks the vector width of its reductions
    return {"type": "cpu", "name": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- comparing --------------------------------------------------------------------------------------------------

ABSENT = "(absent)"


def diff_fingerprints(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Every knob that differs, one line each, "a's value != b's value":
        policy layers.0.mlp.experts.combine: index_add_bf16 != fp32_sum
        policy rotary: rope != (absent)              (a module only one side has)
        versions.torch: 2.13.0+cpu != 2.11.0
    Empty exactly when the hashed sections agree; the names are not compared."""
    out = _diff_policy(a.get("policy") or {}, b.get("policy") or {})
    for section in SECTIONS:
        if section != "policy":
            out += _diff_flat(section, a.get(section, ABSENT), b.get(section, ABSENT))
    if not out and a.get("hash") != b.get("hash"):  # a fingerprint edited by hand, or hashed by other code
        out.append(f"hash: {a.get('hash')} != {b.get('hash')} (no knob differs)")
    return out


def _diff_policy(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    out = []
    for module in [*a, *(m for m in b if m not in a)]:  # model order, a's first
        if module not in a or module not in b:
            left, right = (a[module]["op"] if module in a else ABSENT), (b[module]["op"] if module in b else ABSENT)
            out.append(f"policy {module}: {left} != {right}")
            continue
        for knob in [*a[module], *(k for k in b[module] if k not in a[module])]:
            left, right = a[module].get(knob, ABSENT), b[module].get(knob, ABSENT)
            if left != right:
                out.append(f"policy {module}.{knob}: {_show(left)} != {_show(right)}")
    return out


def _diff_flat(prefix: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in [*a, *(k for k in b if k not in a)]:
            out += _diff_flat(f"{prefix}.{key}", a.get(key, ABSENT), b.get(key, ABSENT))
        return out
    return [] if a == b else [f"{prefix}: {_show(a)} != {_show(b)}"]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], what: str = "the other side") -> None:
    """Raise FingerprintMismatch naming every differing knob unless the two agree."""
    if differences := diff_fingerprints(expected, actual):
        raise FingerprintMismatch(what, differences)


# ---- serving and files ------------------------------------------------------------------------------------------


def fetch_fingerprint(url: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """The fingerprint a parityrt server serves (GET {url}/server_info, `numerics_fingerprint`)."""
    request = urllib.request.Request(url.rstrip("/") + "/server_info")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        info = json.loads(response.read())
    if not isinstance(info, dict) or not isinstance(info.get("numerics_fingerprint"), dict):
        raise ValueError(f"{url}/server_info carries no numerics_fingerprint: not a parityrt server, or an older one")
    return info["numerics_fingerprint"]


def check_server_fingerprint(url: str, expected: dict[str, Any], api_key: str | None = None,
                             timeout: float = 30.0) -> dict[str, Any]:
    """The server's fingerprint, after checking that it is `expected` (a trainer's own, at start); raises
    FingerprintMismatch naming every differing knob otherwise."""
    served = fetch_fingerprint(url, api_key=api_key, timeout=timeout)
    check_fingerprint(expected, served, what=f"the server at {url}")
    return served


def write_fingerprint(run_dir: Path, fp: dict[str, Any]) -> Path:
    path = Path(run_dir) / FILE_NAME
    path.write_text(json.dumps(fp, indent=1))
    return path


def read_fingerprint(path: Path) -> dict[str, Any]:
    """A fingerprint file, or the one in a run directory."""
    path = Path(path)
    return json.loads((path / FILE_NAME if path.is_dir() else path).read_text())
