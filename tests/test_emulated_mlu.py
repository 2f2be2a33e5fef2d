"""Tests of the emulated MLU (``tests/emulated_mlu/torch_mlu``).

Every check runs in a subprocess with ``tests/emulated_mlu`` on PYTHONPATH:
importing ``torch_mlu`` renames torch's PrivateUse1 backend for the rest of
the process, which must not leak into the pytest process. The C++ part is
built (or found in the cache) once per session by the ``mlu_env`` fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EMULATED_MLU_DIR = Path(__file__).resolve().parent / "emulated_mlu"
COLD_BUILD_TIMEOUT_S = 600
RUN_TIMEOUT_S = 240

# Variables that would change what the subprocesses see.
_SCRUBBED_PREFIXES = ("ACCELERATE_", "MLU_", "CN_VISIBLE", "EMULATED_MLU_")
_SCRUBBED_NAMES = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def _clean_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_SCRUBBED_PREFIXES) and key not in _SCRUBBED_NAMES
    }
    env["PYTHONPATH"] = os.pathsep.join([str(EMULATED_MLU_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    # Two processes on two cores: one thread each avoids oversubscription.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_python(
    code: str,
    env: dict[str, str],
    *args: str,
    timeout: float = RUN_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout.

    Fails the test with the subprocess's output if it exits non-zero.
    """
    full_env = {**env, **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def last_json(stdout: str) -> dict:
    """Return the last line of ``stdout`` that parses as a JSON object."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON result in output:\n{stdout}")


def free_port() -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlu_env() -> dict[str, str]:
    """Build the emulated MLU's C++ library once and return the subprocess env."""
    env = _clean_env()
    run_python(
        "import torch, torch_mlu; assert torch.mlu.is_available()",
        env,
        timeout=COLD_BUILD_TIMEOUT_S,
    )
    return env


# ------------------------------------------------------------ single process


def test_import_registers_mlu_like_torch_mlu(mlu_env: dict[str, str]) -> None:
    out = run_python(
        """
        import json, time, torch
        try:
            torch.device("mlu")
            known_before = True
        except RuntimeError:
            known_before = False
        start = time.perf_counter()
        import torch_mlu
        import_s = time.perf_counter() - start
        from accelerate.utils import is_mlu_available
        x = torch.ones(2).mlu()
        print(json.dumps({
            "known_before": known_before,
            "import_s": import_s,
            "backend": torch._C._get_privateuse1_backend_name(),
            "device_module": torch.mlu is torch_mlu.mlu,
            "tensor_mlu": str(x.device), "is_mlu": x.is_mlu,
            "module_mlu": str(torch.nn.Linear(2, 2).mlu(1).weight.device),
            "cncl": torch.distributed.Backend.CNCL,
            "cncl_devices": torch.distributed.Backend.backend_capability["cncl"],
            "accelerate": is_mlu_available(),
        }))
        """,
        mlu_env,
    )
    result = last_json(out)
    assert result["known_before"] is False
    assert result["import_s"] < 2.0, "a cached build must load without recompiling"
    assert result["backend"] == "mlu"
    assert result["device_module"] is True
    assert result["tensor_mlu"] == "mlu:0" and result["is_mlu"] is True
    assert result["module_mlu"] == "mlu:1"
    assert result["cncl"] == "cncl" and result["cncl_devices"] == ["mlu"]
    assert result["accelerate"] is True


def test_round_trip_fallback_ops_and_serialization(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import io, torch, torch_mlu
        for dtype in (torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8):
            src = (torch.randn(5, 7) * 100).to(dtype)
            dev = src.to("mlu:0")
            assert dev.device == torch.device("mlu", 0) and dev.dtype == dtype
            assert torch.equal(dev.cpu(), src), dtype
            assert torch.equal(dev.to("mlu:1").to("mlu:0").cpu(), src), dtype
        x = torch.randn(4, 6)
        m = x.to("mlu")
        results = {
            "add": m + 1, "matmul": m @ m.T, "sum": m.sum(1), "view": m.view(24),
            "slice": m[1:3, ::2], "transpose": m.t().contiguous(), "cat": torch.cat([m, m]),
            "softmax": torch.softmax(m, 1), "max": m.max(0).values, "where": torch.where(m > 0, m, 0.0),
            "randn": torch.randn(3, device="mlu"), "zeros": torch.zeros(2, device="mlu"),
        }
        for name, value in results.items():
            assert value.device.type == "mlu", (name, value.device)
        assert torch.allclose(results["matmul"].cpu(), x @ x.T)
        assert torch.equal(results["slice"].cpu(), x[1:3, ::2])
        assert (m.sum() - x.sum()).abs().item() < 1e-5
        m.mul_(2).clamp_(min=0)
        assert torch.equal(m.cpu(), (x * 2).clamp(min=0))
        out = torch.empty(0, device="mlu")
        torch.add(m, m, out=out)
        assert out.shape == m.shape and torch.equal(out.cpu(), m.cpu() * 2)
        buf = io.BytesIO()
        torch.save({"t": m, "row": m[1]}, buf)
        buf.seek(0)
        loaded = torch.load(buf)
        assert loaded["t"].device.type == "mlu" and torch.equal(loaded["t"].cpu(), m.cpu())
        assert torch.equal(loaded["row"].cpu(), m[1].cpu())
        """,
        mlu_env,
    )


def test_parameter_identity_survives_to_mlu(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import torch, torch_mlu
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        params = list(model.parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.to("mlu")
        assert all(a is b for a, b in zip(params, model.parameters())), "Parameters replaced"
        assert all(p.device.type == "mlu" for p in optimizer.param_groups[0]["params"])
        assert all(b.device.type == "mlu" for b in model.buffers())
        model.to("cpu")
        assert all(a is b for a, b in zip(params, model.parameters()))
        assert all(p.device.type == "cpu" for p in params)
        """,
        mlu_env,
    )


def test_timm_training_step_matches_cpu(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import torch, torch_mlu, timm
        torch.manual_seed(0)
        cpu_model = timm.create_model("resnet10t", num_classes=5)
        mlu_model = timm.create_model("resnet10t", num_classes=5)
        mlu_model.load_state_dict(cpu_model.state_dict())
        mlu_model.to("mlu:0")
        activations = []
        for module in mlu_model.modules():
            module.register_forward_hook(lambda mod, inp, out: activations.append(out.device.type))
        images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        for model, device in ((cpu_model, "cpu"), (mlu_model, "mlu:0")):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            for _ in range(2):
                loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if device != "cpu":
                assert loss.device.type == "mlu"
                assert activations and set(activations) == {"mlu"}, set(activations)
                assert all(p.device.type == "mlu" and p.grad.device.type == "mlu"
                           for p in model.parameters())
        for (name, a), b in zip(cpu_model.state_dict().items(), mlu_model.state_dict().values()):
            assert b.device.type == "mlu", name
            assert torch.allclose(a.float(), b.cpu().float(), rtol=1e-4, atol=1e-5), name
        """,
        mlu_env,
    )


def test_autocast_fp16_casts_conv_and_linear(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import warnings, torch, torch_mlu
        conv = torch.nn.Conv2d(3, 4, 3).to("mlu")
        linear = torch.nn.Linear(8, 2).to("mlu")
        x, v = torch.randn(2, 3, 8, 8, device="mlu"), torch.randn(2, 8, device="mlu")
        a, b = torch.randn(2, 3, 4, device="mlu"), torch.randn(2, 4, 5, device="mlu")
        with torch.autocast("mlu", dtype=torch.float16):
            assert conv(x).dtype == torch.float16
            assert linear(v).dtype == torch.float16
            assert torch.bmm(a, b).dtype == torch.float16
            assert torch.addmm(v[:, :2], v, v.T[:, :2]).dtype == torch.float16
            assert torch.softmax(linear(v), 1).dtype == torch.float32  # fp32_set_opt_dtype
            assert torch.nn.functional.mse_loss(linear(v), v[:, :2]).dtype == torch.float32
            dst = torch.zeros(3, device="mlu")
            dst.copy_(torch.ones(3))  # needs the autocast fallthrough
            assert dst.sum().item() == 3.0
        assert linear(v).dtype == torch.float32
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.mlu.amp.autocast():
                assert linear(v).dtype == torch.float16
        # NOTE: torch_mlu deprecates torch.mlu.amp.* from its 2.4 line on (amp/autocast_mode.py).
        assert any(issubclass(w.category, FutureWarning) for w in caught) == (torch_mlu.EMULATED_LINE == "2.4")
        """,
        mlu_env,
    )


def test_grad_scaler_skips_step_on_inf(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import torch, torch_mlu
        model = torch.nn.Linear(3, 2).to("mlu")
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scaler = torch.mlu.amp.GradScaler(init_scale=1024.0)
        before = [p.detach().cpu().clone() for p in model.parameters()]
        with torch.autocast("mlu", dtype=torch.float16):
            loss = model(torch.randn(4, 3, device="mlu")).float().sum() * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert all(torch.equal(a, p.detach().cpu()) for a, p in zip(before, model.parameters()))
        assert scaler.get_scale() == 512.0, scaler.get_scale()
        # A finite step then really updates the weights.
        optimizer.zero_grad()
        with torch.autocast("mlu", dtype=torch.float16):
            loss = model(torch.randn(4, 3, device="mlu")).float().sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert not torch.equal(before[0], model.weight.detach().cpu())
        """,
        mlu_env,
    )


def test_device_module_api(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import torch, torch_mlu
        mlu = torch.mlu
        assert mlu.is_available() and mlu.device_count() == 2 and mlu.is_initialized()
        mlu._lazy_init()
        assert mlu.current_device() == 0
        mlu.set_device(1)
        assert mlu.current_device() == 1 and torch.empty(1, device="mlu").device.index == 1
        with mlu.device(0):
            assert torch.empty(1, device="mlu").device.index == 0
        assert mlu.current_device() == 1
        mlu.set_device("mlu:0")
        mlu.synchronize()
        assert mlu.is_bf16_supported() is False
        props = mlu.get_device_properties(0)
        assert props.total_memory > 0 and (props.major, props.minor) == mlu.get_device_capability()
        assert "MLU" in mlu.get_device_name() and props.name == mlu.get_device_name(0)

        torch.manual_seed(7)  # calls mlu.manual_seed_all: must not recurse
        assert mlu.initial_seed() == 7
        state = mlu.get_rng_state()
        assert state.dtype == torch.uint8 and state.device.type == "cpu"
        assert len(mlu.get_rng_state_all()) == 2
        mlu.manual_seed(1)
        mlu.set_rng_state(state)
        assert torch.equal(mlu.get_rng_state(), state)
        mlu.set_rng_state_all(mlu.get_rng_state_all())
        mlu.seed(); mlu.seed_all()

        mlu.reset_peak_memory_stats()
        base = mlu.memory_allocated()
        block = torch.empty(1024, 1024, device="mlu")
        assert mlu.memory_allocated() - base == 4 * 1024 * 1024
        assert mlu.memory_reserved() >= mlu.memory_allocated()
        del block
        assert mlu.memory_allocated() == base
        assert mlu.max_memory_allocated() >= base + 4 * 1024 * 1024
        mlu.reset_peak_memory_stats()
        assert mlu.max_memory_allocated() == base
        free, total = mlu.mem_get_info()
        assert 0 < free <= total == props.total_memory
        mlu.empty_cache()

        start, end = mlu.Event(enable_timing=True), mlu.Event(enable_timing=True)
        start.record()
        torch.randn(256, 256, device="mlu") @ torch.randn(256, 256, device="mlu")
        end.record()
        end.synchronize()
        assert end.query() and start.elapsed_time(end) > 0
        stream = mlu.current_stream()
        with stream:
            stream.synchronize()
        assert stream.query()
        """,
        mlu_env,
    )


def test_device_count_follows_environment(mlu_env: dict[str, str]) -> None:
    run_python(
        """
        import os, torch, torch_mlu
        assert torch.mlu.device_count() == 3  # read at import
        torch.zeros(1, device="mlu:2")
        count = torch.mlu.visible_device_count
        os.environ["MLU_VISIBLE_DEVICES"] = "1"
        assert count() == 1
        os.environ["CN_VISIBLE_DEVICES"] = "0,2,3"
        assert count() == 3  # CN_VISIBLE_DEVICES wins, as in torch_mlu
        os.environ["CN_VISIBLE_DEVICES"] = ""
        assert count() == 0
        """,
        mlu_env,
        extra_env={"EMULATED_MLU_DEVICE_COUNT": "3"},
    )


# ------------------------------------------------------------ two processes

_SPAWN_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, port: int) -> None:
    import torch_mlu  # noqa: F401

    torch.mlu.set_device(rank)
    dist.init_process_group(
        "cncl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    dev = torch.device("mlu", rank)

    t = torch.full((3,), float(rank + 1), device=dev)
    dist.all_reduce(t)
    assert t.device == dev and t.cpu().tolist() == [3.0] * 3
    for op, expected in ((dist.ReduceOp.MAX, 2.0), (dist.ReduceOp.MIN, 1.0)):
        t = torch.full((2,), float(rank + 1), device=dev)
        dist.all_reduce(t, op=op)
        assert t.cpu().tolist() == [expected] * 2, (op, t.cpu())
    # NOTE: CNCL has no AVG (process_group_cncl.cpp: "Cannot use ReduceOp.AVG with CNCL";
    # RuntimeError on the 2.1 line, ValueError from 2.3) and sends float64 as float32.
    try:
        dist.all_reduce(torch.ones(2, device=dev), op=dist.ReduceOp.AVG)
        avg_refused = False
    except (RuntimeError, ValueError) as err:
        avg_refused = "Cannot use ReduceOp.AVG with CNCL" in str(err)
    assert avg_refused
    doubles = torch.tensor([2.0**24 if rank == 0 else 1.0], dtype=torch.float64, device=dev)
    dist.all_reduce(doubles)
    assert doubles.item() == 2.0**24, doubles.item()  # 2**24 + 1 has no float32
    b = torch.arange(4.0, device=dev) * (rank + 1)
    dist.broadcast(b, src=1)
    assert b.device == dev and b.cpu().tolist() == [0.0, 2.0, 4.0, 6.0]
    gathered = [torch.empty(2, device=dev) for _ in range(2)]
    dist.all_gather(gathered, torch.full((2,), float(rank), device=dev))
    assert [g.cpu().tolist() for g in gathered] == [[0.0, 0.0], [1.0, 1.0]]
    flat = torch.empty(4, device=dev)
    dist.all_gather_into_tensor(flat, torch.full((2,), float(rank), device=dev))
    assert flat.cpu().tolist() == [0.0, 0.0, 1.0, 1.0]
    piece = torch.empty(2, device=dev)
    dist.reduce_scatter_tensor(piece, torch.arange(4.0, device=dev))
    assert piece.cpu().tolist() == [4.0 * rank, 4.0 * rank + 2.0]
    t = torch.full((2,), float(rank + 1), device=dev)
    dist.reduce(t, dst=0)
    assert t.cpu().tolist() == ([3.0, 3.0] if rank == 0 else [2.0, 2.0])
    swapped = torch.empty(2, device=dev)
    dist.all_to_all_single(swapped, torch.tensor([10.0 * rank, 10.0 * rank + 1], device=dev))
    assert swapped.cpu().tolist() == [rank, 10.0 + rank]
    if rank == 0:
        dist.send(torch.tensor([42.0], device=dev), dst=1)
    else:
        received = torch.empty(1, device=dev)
        dist.recv(received, src=0)
        assert received.item() == 42.0
    work = dist.all_reduce(torch.ones(1, device=dev), async_op=True)
    assert work.get_future().wait()[0].cpu().item() == 2.0 and work.wait()
    objects = [None, None]
    dist.all_gather_object(objects, {"rank": rank})  # CPU tensors underneath
    assert objects == [{"rank": 0}, {"rank": 1}]
    dist.barrier()

    torch.manual_seed(rank)  # different replicas: DDP must broadcast rank 0's
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2),
    ).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(2):
        loss = ddp(torch.randn(4, 3, 8, 8, device=dev)).square().mean()  # per-rank data
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.device == dev and p.grad.device == dev for p in model.parameters())
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(params) for _ in range(2)]
    dist.all_gather(replicas, params)
    assert torch.equal(replicas[0].cpu(), replicas[1].cpu()), "DDP replicas diverged"
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]),), nprocs=2)
"""


@pytest.mark.slow
def test_cncl_collectives_and_ddp_two_processes(mlu_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "spawn_cncl.py"
    script.write_text(_SPAWN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port())],
        env=mlu_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_MLU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
gpu_ids: all
rdzv_backend: static
same_network: true
main_process_ip: 127.0.0.1
main_process_port: {port}
"""

_ACCELERATE_SCRIPT = """
import json
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

state = PartialState()
result = {
    "rank": state.process_index,
    "distributed_type": str(state.distributed_type),
    "backend": state.backend,
    "device": str(state.device),
    "dist_backend": torch.distributed.get_backend(),
}
accelerator = Accelerator(mixed_precision="fp16")
result["scaler_is_mlu"] = isinstance(accelerator.scaler, torch.mlu.amp.GradScaler)
set_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
first_layer_dtypes = []
model[0].register_forward_hook(lambda m, i, out: first_layer_dtypes.append(str(out.dtype)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
loader = torch.utils.data.DataLoader(data, batch_size=4)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
for inputs, labels in loader:
    loss = torch.nn.functional.cross_entropy(model(inputs), labels)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
result["autocast_dtypes"] = sorted(set(first_layer_dtypes))
result["loss_device"] = loss.device.type
result["param_devices"] = sorted({str(p.device) for p in model.parameters()})

accelerator.save_state(sys.argv[1])
accelerator.wait_for_everyone()
saved = [p.detach().cpu().clone() for p in model.parameters()]
saved_rng = torch.mlu.get_rng_state()
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
torch.mlu.manual_seed(1234)
accelerator.load_state(sys.argv[1])
result["params_restored"] = all(torch.equal(a, p.detach().cpu()) for a, p in zip(saved, model.parameters()))
result["mlu_rng_restored"] = torch.equal(saved_rng, torch.mlu.get_rng_state())
result["param_devices_after_load"] = sorted({p.device.type for p in model.parameters()})
ranks = accelerator.gather(torch.tensor([accelerator.process_index], device=accelerator.device))
result["gathered"] = ranks.cpu().tolist()
accelerator.wait_for_everyone()
# One file per rank: two ranks printing at once can interleave on stdout.
with open(f"{sys.argv[2]}/result_{state.process_index}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def accelerate_run(mlu_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run one 2-process ``accelerate launch`` and return each rank's result."""
    workdir = tmp_path_factory.mktemp("accelerate")
    config = workdir / "multi_mlu.yaml"
    config.write_text(_ACCELERATE_CONFIG.format(port=free_port()))
    script = workdir / "train.py"
    script.write_text(_ACCELERATE_SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            str(script),
            str(workdir / "state"),
            str(workdir),
        ],
        env=mlu_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    results = {}
    for path in workdir.glob("result_*.json"):
        record = json.loads(path.read_text())
        results[record["rank"]] = record
    return {
        "returncode": proc.returncode,
        "ranks": results,
        "log": proc.stdout + proc.stderr[-6000:],
    }


def _rank_results(run: dict) -> list[dict]:
    assert run["returncode"] == 0 and sorted(run["ranks"]) == [0, 1], run["log"]
    return [run["ranks"][0], run["ranks"][1]]


@pytest.mark.slow
def test_accelerate_partial_state_is_multi_mlu(accelerate_run: dict) -> None:
    for rank, result in enumerate(_rank_results(accelerate_run)):
        assert result["distributed_type"] == "DistributedType.MULTI_MLU"
        assert result["backend"] == "cncl" and result["dist_backend"] == "cncl"
        assert result["device"] == f"mlu:{rank}"
        assert result["gathered"] == [0, 1]


def test_accelerate_fp16_uses_mlu_scaler_and_autocast(accelerate_run: dict) -> None:
    for rank, result in enumerate(_rank_results(accelerate_run)):
        assert result["scaler_is_mlu"] is True
        assert result["autocast_dtypes"] == ["torch.float16"]
        assert result["loss_device"] == "mlu"
        assert result["param_devices"] == [f"mlu:{rank}"]


def test_accelerate_save_and_load_state_on_mlu(accelerate_run: dict) -> None:
    for result in _rank_results(accelerate_run):
        assert result["params_restored"] is True
        assert result["mlu_rng_restored"] is True
        assert result["param_devices_after_load"] == ["mlu"]
