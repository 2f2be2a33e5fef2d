"""The backend adapter: device/precision resolution, Accelerate agreement, and the one-seam rule."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import backend
from trainer.backend import Backend, BackendError, accelerator, check_accelerator_state, precision, resolve_precision

PACKAGE = Path(backend.__file__).resolve().parent.parent
SEAM = PACKAGE / "backend"

# A device type or collective backend named as a string, or a call into a device module.
FORBIDDEN = re.compile(
    r"""torch\.(cuda|mlu|npu|xpu|mps)\b|\.(cuda|mlu|npu|xpu)\(|['"](cuda|mlu|npu|xpu|mps|cpu|nccl|cncl|hccl|xccl|gloo)(:\d+)?['"]"""
)


def test_no_module_outside_backend_names_a_device():
    # The seam is exactly the package trainer/backend/: no other file, wherever it lies or
    # whatever it is named (a stray backend.py elsewhere included), may name a device.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == SEAM:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "device-specific code outside trainer/backend/:\n" + "\n".join(offenders)


def test_seam_is_a_package_of_small_modules_without_import_circles():
    import ast

    assert not (PACKAGE / "backend.py").exists()
    modules = {path.stem: path for path in SEAM.glob("*.py") if path.stem != "__init__"}
    assert len(modules) >= 6
    edges = {}
    for name, path in modules.items():
        assert len(path.read_text().splitlines()) < 400, path
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer.backend"):
                sub = node.module.removeprefix("trainer.backend").lstrip(".")
                # `from trainer.backend import fused` names the submodule; the package itself
                # is not imported from inside it
                assert sub or all(a.name in modules for a in node.names), f"{name} imports the package trainer.backend"
                targets |= {sub} if sub else {a.name for a in node.names}
        edges[name] = targets
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, "import circle: " + " -> ".join([*visiting, name])
        if name in done:
            return
        visiting.append(name)
        for target in edges[name]:
            visit(target)
        visiting.pop()
        done.add(name)

    for name in modules:
        visit(name)


def test_scanner_catches_device_names():
    # The rule above must not pass vacuously: each pattern it exists for is caught.
    for line in [
        "x = torch.cuda.synchronize()",
        "t.mlu(0)",
        "dist.init_process_group('cncl')",
        'd = "cuda:0"',
        "torch.mlu.set_device(1)",
        'device_type == "cpu"',
    ]:
        assert FORBIDDEN.search(line), line
    assert not FORBIDDEN.search("accelerator.device")


def test_auto_resolves_to_cpu_here():
    assert backend.resolve_device_type("auto") in backend.available_device_types()
    assert backend.resolve_device_type("cpu") == "cpu"


def test_missing_device_names_what_was_found():
    with pytest.raises(
        BackendError, match=r"backend.device=mlu is not available here \(found: " r".*cpu.*torch_mlu is not installed"
    ):
        backend.resolve_device_type("mlu")


def test_process_group_mapping():
    assert backend.PROCESS_GROUP_BACKENDS == {
        "mlu": "cncl",
        "cuda": "nccl",
        "npu": "hccl",
        "xpu": "xccl",
        "mps": "gloo",
        "cpu": "gloo",
    }


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "expected"),
    [
        ("auto", "mlu", False, "fp16"),  # MLU370: no bf16, fp16 + loss scaler
        ("auto", "cuda", True, "bf16"),
        ("auto", "cpu", False, "no"),
        ("auto", "cpu", True, "bf16"),
        ("fp32", "mlu", False, "no"),
        ("fp16", "mlu", False, "fp16"),
    ],
)
def test_precision_per_device(monkeypatch, requested, device, bf16, expected):
    monkeypatch.setattr(precision, "is_bf16_supported", lambda d: bf16)
    assert resolve_precision(requested, device) == expected


@pytest.mark.parametrize(
    ("native_bf16", "expected"), [(False, "no"), (True, "bf16")], ids=["avx2_cpu", "amx_or_avx512_bf16_cpu"]
)
def test_auto_on_either_cpu_kind_follows_the_bf16_probe(monkeypatch, native_bf16, expected):
    # The probe itself (oneDNN's instruction check) patched: AMD EPYC with avx2 only says
    # no, an Intel Xeon with AMX or avx512_bf16 says yes; `auto` must follow it either way.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16, raising=False)
    assert backend.is_bf16_supported("cpu") is native_bf16
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "no"


def test_bf16_without_support_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(precision, "is_bf16_supported", lambda d: False)
    with pytest.raises(BackendError, match="no native bf16"):
        resolve_precision("bf16", "mlu")
    with pytest.raises(BackendError, match="fp16 needs an accelerator"):
        resolve_precision("fp16", "cpu")


def _state(**kw):
    base = dict(
        device_type="mlu",
        device=torch.device("cpu"),
        mixed_precision="fp16",
        num_processes=2,
        distributed_type="MULTI_CPU",
        process_group_backend="gloo",
    )
    base.update(kw)
    return Backend(**base)


def test_disagreeing_accelerate_state_names_cause_and_fix(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(BackendError) as err:
        check_accelerator_state(_state(), local_rank=0)
    text = str(err.value)
    assert "expected MULTI_MLU" in text and "expected cncl" in text and "use_cpu: true" in text


def test_cuda_visible_devices_on_mlu_host_is_flagged(monkeypatch):
    monkeypatch.setattr(accelerator.importlib.util, "find_spec", lambda name: object() if name == "torch_mlu" else None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("MLU_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CN_VISIBLE_DEVICES", raising=False)
    assert any("MLU_VISIBLE_DEVICES" in w for w in backend.pitfalls("mlu"))


def test_agreeing_state_passes():
    check_accelerator_state(
        _state(device_type="cpu", distributed_type="MULTI_CPU", process_group_backend="gloo"), local_rank=1
    )


def test_cpu_accelerator_and_helpers():
    accelerator, b = backend.create_accelerator("cpu", "fp32")
    assert b.device_type == "cpu" and b.mixed_precision == "no" and accelerator.device.type == "cpu"
    assert b.pin_memory_kwargs() == {"pin_memory": False} and b.on_host and b.precision == "fp32"
    with b.timer() as t:
        torch.ones(4).sum()
    assert t.elapsed_s >= 0
    assert b.peak_memory_bytes() == 0
    assert b.host_memory == ("retain" if platform.libc_ver()[0] == "glibc" else "release")


# A step's worth of activations (five blocks, 256 MiB in all), allocated, filled and freed
# 30 times; prints the page faults of the last 5 times.
_FAULTS_SCRIPT = """
import resource, sys, torch
from trainer.backend import retain_freed_host_memory
print(retain_freed_host_memory() if sys.argv[1] == "retain" else False)
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(mib << 18).fill_(1.0) for mib in (96, 32, 64, 16, 48)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([step() for _ in range(30)][-5:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_retained_host_memory_is_reused_without_page_faults():
    def late_faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    took, retained = late_faults("retain")
    _, released = late_faults("release")
    pages = 5 * (256 << 20) // 4096
    assert took == "True"
    # glibc's defaults unmap the large blocks and every step faults them in again.
    assert released > pages // 2 and retained < pages // 100, (released, retained)


def test_host_memory_is_released_for_accelerators(monkeypatch):
    calls = []
    monkeypatch.setattr(accelerator, "retain_freed_host_memory", lambda: calls.append(1) or True)
    backend.create_accelerator("cpu", "fp32", host_memory="release")
    assert calls == []
    _, b = backend.create_accelerator("cpu", "fp32", host_memory="retain")
    assert calls == [1] and b.host_memory == "retain"
