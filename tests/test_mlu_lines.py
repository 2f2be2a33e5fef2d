"""The emulated MLU per torch_mlu line (tests/emulated_mlu, `EMULATED_TORCH_MLU_LINE`), and the
trainer right on each: what the real torch_mlu does on its r1.22_pt2.1.0 / pt2.3.0 / pt2.4.0
branches that a lenient emulator would hide. Every check runs in a subprocess (importing
torch_mlu renames torch's PrivateUse1 backend for the rest of a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EMULATED = REPO / "tests" / "emulated_mlu"
_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
# A torch_mlu line needs at least its own torch (the 2.3 line's scaler is torch.amp.GradScaler).
LINES = [line for line in ("2.1", "2.3", "2.4") if _TORCH >= tuple(int(p) for p in line.split("."))]


def mlu_env(line: str | None = None, **extra: str) -> dict[str, str]:
    drop = ("MLU_VISIBLE_DEVICES", "CN_VISIBLE_DEVICES", "EMULATED_TORCH_MLU_LINE", "LOCAL_RANK", "RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and "CNCL" not in k and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(EMULATED), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    if line:
        env["EMULATED_TORCH_MLU_LINE"] = line
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


# ------------------------------------------------------------------ the loss scaler


@pytest.mark.parametrize("line", LINES)
def test_scaler_class_is_the_lines(line):
    out = last_json(
        run_python(
            """
            import json, warnings, torch, torch_mlu
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scaler = torch.mlu.amp.GradScaler()
            print(json.dumps({
                "line": torch_mlu.EMULATED_LINE, "version": torch_mlu.__version__,
                "cuda_subclass": isinstance(scaler, torch.cuda.amp.GradScaler),
                "amp_subclass": hasattr(torch.amp, "GradScaler") and type(scaler).__mro__[1] is torch.amp.GradScaler,
                "deprecated": any(issubclass(w.category, FutureWarning) for w in caught),
            }))
            """,
            mlu_env(line),
        )
    )
    assert out["line"] == line and out["version"] == f"1.22.2-torch{line}.0"
    # NOTE: torch_mlu/mlu/amp/grad_scaler.py: pt2.1 subclasses torch.cuda.amp.GradScaler; pt2.3 and
    # pt2.4 subclass torch.amp.GradScaler directly, and pt2.4 deprecates the name.
    assert out["cuda_subclass"] is (line == "2.1")
    assert out["amp_subclass"] is (line != "2.1")
    assert out["deprecated"] is (line == "2.4")


@pytest.mark.parametrize("line", LINES)
def test_trainer_keeps_the_lines_scaler_and_steps_in_fp16(line):
    # The old backend replaced Accelerate's scaler with torch.amp.GradScaler("mlu"): an
    # AttributeError on torch 2.1, and on the emulated 2.1 line not the line's class.
    out = last_json(
        run_python(
            """
            import json, torch
            from trainer.backend import create_accelerator
            accelerator, backend = create_accelerator("mlu", "fp16")
            model = torch.nn.Linear(4, 2)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            model, optimizer = accelerator.prepare(model, optimizer)
            before = model.weight.detach().cpu().clone()
            with accelerator.autocast():
                # Small inputs: at the scaler's first scale (2**16) fp16 gradients of unit-sized
                # ones overflow now and then, and the scaler rightly skips that step.
                loss = model(0.01 * torch.randn(8, 4, device=accelerator.device)).float().pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            print(json.dumps({
                "scaler_is_lines": isinstance(accelerator.scaler, torch.mlu.amp.GradScaler),
                "scaler": type(accelerator.scaler).__module__ + "." + type(accelerator.scaler).__name__,
                "stepped": not torch.equal(before, model.weight.detach().cpu()),
                "precision": backend.precision,
            }))
            """,
            mlu_env(line),
        )
    )
    assert out["scaler_is_lines"] is True, out["scaler"]
    assert out["stepped"] is True and out["precision"] == "fp16"


# ------------------------------------------------------- the emulated card's strictness


def test_fused_and_foreach_lists_leave_mlu_out_and_fused_sgd_falls_back_with_a_warning():
    out = last_json(
        run_python(
            """
            import json, warnings, torch, torch_mlu
            from torch.utils import _foreach_utils
            result = {
                "fused": _foreach_utils._get_fused_kernels_supported_devices(),
                "foreach": _foreach_utils._get_foreach_kernels_supported_devices(),
                "has_fused_sgd": hasattr(torch, "_fused_sgd_"),
            }
            if result["has_fused_sgd"]:
                p = torch.zeros(2, device="mlu")
                kwargs = dict(weight_decay=0.0, momentum=0.0, lr=0.5, dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=False)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch._fused_sgd_([p], [torch.ones_like(p)], [], **kwargs)
                    torch._fused_sgd_([p], [torch.ones_like(p)], [], **kwargs)
                result["fallback_warnings"] = [str(w.message) for w in caught if "fall back" in str(w.message)]
                result["ran_on_fallback"] = p.cpu().tolist()
                model = torch.nn.Linear(2, 1).to("mlu")
                try:
                    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
                    model(torch.ones(1, 2, device="mlu")).sum().backward()
                    optimizer.step()
                    result["fused_sgd_optimizer"] = "ran"
                except RuntimeError as err:
                    result["fused_sgd_optimizer"] = str(err)
            print(json.dumps(result))
            """,
            mlu_env(),
        )
    )
    # NOTE: torch_mlu/utils/_foreach_utils.py (pt2.4) and pytorch_patches/support_mlu_amp.diff (pt2.1, pt2.3)
    assert out["fused"] == ["cuda", "xpu"] and out["foreach"] == ["cuda", "xpu"]
    if out["has_fused_sgd"]:
        # MLUFallback.cpp: the op runs on the CPU, announced once per op
        assert len(out["fallback_warnings"]) == 1 and "aten::_fused_sgd_" in out["fallback_warnings"][0]
        assert out["ran_on_fallback"] == [-1.0, -1.0]
        assert "supported devices" in out["fused_sgd_optimizer"] or "fused" in out["fused_sgd_optimizer"]


def test_float64_on_the_device_is_float32():
    out = last_json(
        run_python(
            """
            import json, torch, torch_mlu
            x = torch.tensor([2.0**24 + 1], dtype=torch.float64, device="mlu")
            y = torch.tensor([2.0**24], dtype=torch.float64, device="mlu") + 1
            z = torch.zeros(1, dtype=torch.float64, device="mlu")
            z += 0.1
            print(json.dumps({"stored": x.item(), "computed": y.item(), "tenth": z.item(), "dtype": str(x.dtype)}))
            """,
            mlu_env(),
        )
    )
    # NOTE: torch_mlu aten/utils/types.cpp maps float64 to CNNL's float32: the dtype says float64,
    # the values are float32's.
    assert out["dtype"] == "torch.float64"
    assert out["stored"] == 2.0**24 and out["computed"] == 2.0**24
    assert out["tenth"] == float(torch.tensor(0.1, dtype=torch.float32))


def test_mlu_generator_drives_device_random_ops_apart_from_the_cpu_generator():
    out = last_json(
        run_python(
            """
            import json, torch, torch_mlu
            def draw():
                return torch.randn(4, device="mlu").cpu().tolist() + torch.nn.functional.dropout(
                    torch.ones(8, device="mlu"), 0.5).cpu().tolist()
            torch.random.default_generator.manual_seed(0)
            a = draw()
            torch.random.default_generator.manual_seed(0)
            b = draw()
            torch.mlu.manual_seed(7)
            c = draw()
            state = torch.mlu.get_rng_state()
            d = draw()
            torch.mlu.manual_seed(7)
            torch.random.default_generator.manual_seed(123)  # the CPU's generator has no say
            e = draw()
            torch.mlu.set_rng_state(state)
            f = draw()
            torch.mlu.set_device(1)
            torch.mlu.manual_seed(7)
            g = draw()
            print(json.dumps({"cpu_seed_repeats": a == b, "mlu_seed_repeats": c == e, "state_repeats": d == f,
                              "per_device": c == g, "seed": torch.mlu.initial_seed(),
                              "amp_dtypes": [str(t) for t in torch.mlu.get_amp_supported_dtype()],
                              "bf16": torch.mlu.is_bf16_supported()}))
            """,
            mlu_env(),
        )
    )
    # NOTE: torch_mlu/mlu/random.py: one generator per MLU, not the CPU's.
    assert out["cpu_seed_repeats"] is False
    assert out["mlu_seed_repeats"] is True and out["state_repeats"] is True and out["per_device"] is True
    assert out["seed"] == 7
    # NOTE: torch_mlu/mlu/autocast_utils.py: fp16 and bf16 on every chip; is_bf16_supported tells MLU370 apart.
    assert out["amp_dtypes"] == ["torch.float16", "torch.bfloat16"] and out["bf16"] is False


# ---------------------------------------------------------- a collective that dies

_PEER_SCRIPT = """
import os, sys, time, datetime, torch, torch_mlu
import torch.distributed as dist
rank, port = int(sys.argv[1]), int(sys.argv[2])
torch.mlu.set_device(rank)
dist.init_process_group("cncl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=3))
if rank == 1:
    time.sleep(float(sys.argv[3]))  # never joins the all-reduce
    os._exit(0)
try:
    dist.all_reduce(torch.ones(2, device="mlu:0"))
    print("completed", flush=True)
except Exception as err:
    print(f"raised in caller: {type(err).__name__}: {err}", flush=True)
os._exit(0)
"""


def _collective_that_dies(line: str, variables: dict[str, str], peer_sleep_s: float, wait_s: float) -> tuple:
    """Rank 0's (exit code or None while still waiting, stdout, stderr) when rank 1 never joins."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = mlu_env(line, **variables)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PEER_SCRIPT, str(rank), str(port), str(peer_sleep_s)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        code = procs[0].wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        code = None
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    out, err = procs[0].communicate()
    procs[1].communicate()
    return code, out, err


@pytest.mark.slow  # two processes and a 3 s collective timeout
@pytest.mark.parametrize("line", LINES)
def test_async_error_handling_ends_the_process_with_the_watchdogs_lines(line):
    name = "CNCL_ASYNC_ERROR_HANDLING" if line == "2.1" else "TORCH_CNCL_ASYNC_ERROR_HANDLING"
    code, out, err = _collective_that_dies(line, {name: "1"}, peer_sleep_s=30, wait_s=60)
    # NOTE: process_group_cncl.cpp: the watchdog logs, rethrows on its own thread, and the process aborts;
    # the caller never sees an exception.
    assert code == -6, (code, out, err[-2000:])
    assert "raised in caller" not in out and "completed" not in out
    assert "To avoid data inconsistency, we are taking the entire process down." in err


@pytest.mark.slow  # two processes and a 3 s collective timeout
@pytest.mark.parametrize("line", LINES)
def test_blocking_wait_raises_in_the_caller(line):
    name = "CNCL_BLOCKING_WAIT" if line == "2.1" else "TORCH_CNCL_BLOCKING_WAIT"
    code, out, err = _collective_that_dies(line, {name: "1"}, peer_sleep_s=30, wait_s=60)
    assert code == 0 and "raised in caller" in out and f"blocking wait ({name}=1)" in out, (code, out, err[-2000:])


@pytest.mark.slow  # two processes and a 3 s collective timeout
def test_the_2_1_line_hangs_under_the_newer_lines_variable_name():
    # NOTE: r1.22_pt2.1.0 reads CNCL_ASYNC_ERROR_HANDLING only (default off): TORCH_CNCL_* is not its name.
    code, out, err = _collective_that_dies("2.1", {"TORCH_CNCL_ASYNC_ERROR_HANDLING": "1"}, peer_sleep_s=4, wait_s=12)
    assert code is None, (code, out, err[-2000:])  # still waiting when killed


@pytest.mark.parametrize("line", LINES)
def test_trainer_sets_the_variables_its_line_reads(line):
    script = """
        import json, os
        from trainer.backend import enable_collective_error_handling, import_device_plugins
        import_device_plugins()
        print(json.dumps(enable_collective_error_handling("mlu")))
        """
    plain = last_json(run_python(script, mlu_env(line)))
    blocking = last_json(run_python(script, mlu_env(line, TORCH_CNCL_BLOCKING_WAIT="1")))
    if line == "2.1":
        assert plain == {"CNCL_ASYNC_ERROR_HANDLING": "1", "CNCL_BLOCKING_WAIT": ""}
        # the documented name, carried over to the one the 2.1 line reads
        assert blocking == {"CNCL_ASYNC_ERROR_HANDLING": "1", "CNCL_BLOCKING_WAIT": "1"}
    else:
        assert plain == {"TORCH_CNCL_ASYNC_ERROR_HANDLING": "1", "TORCH_CNCL_BLOCKING_WAIT": ""}
        assert blocking == {"TORCH_CNCL_ASYNC_ERROR_HANDLING": "1", "TORCH_CNCL_BLOCKING_WAIT": "1"}


# ------------------------------------------------------------- the trainer on each line


def test_fused_optimizer_choice_never_takes_the_cpu_fallback():
    out = last_json(
        run_python(
            """
            import json, torch
            from trainer.backend import import_device_plugins
            from trainer.backend.fused import fused_sgd_status
            import_device_plugins()
            listed = fused_sgd_status(torch.device("mlu:0"))
            # Were mlu listed again (a torch_mlu that did not patch the list), the op still has no MLU
            # kernel: only its CPU fallback would run, and the choice must still say no.
            from torch.utils import _foreach_utils
            _foreach_utils._get_fused_kernels_supported_devices = lambda: ["cuda", "xpu", "mlu"]
            relisted = fused_sgd_status(torch.device("mlu:0"))
            print(json.dumps({"listed": listed, "relisted": relisted, "has_op": hasattr(torch, "_fused_sgd_")}))
            """,
            mlu_env(),
        )
    )
    assert out["listed"][0] is False and out["relisted"][0] is False
    if out["has_op"]:
        assert "leaves out mlu" in out["listed"][1] and "no mlu kernel" in out["relisted"][1]


def test_erasing_noise_on_the_device_depends_on_the_batch_alone():
    # Random erasing draws its noise on the device, from the MLU generator: seeded per
    # micro-batch as the CPU one is, the same (epoch, batch) erases alike whatever ran before,
    # which is what a resumed run relies on.
    out = last_json(
        run_python(
            """
            import json, torch
            from trainer.backend import import_device_plugins
            import_device_plugins()
            from trainer.batch_augment import create_batch_augment
            from trainer.config import AugConfig, MixupConfig
            erase = AugConfig(re_prob=1.0, re_mode="pixel")
            augment = create_batch_augment(
                mixup=MixupConfig(), aug=erase, num_classes=4, label_smoothing=0.0, seed=0
            )
            images = torch.zeros(4, 3, 16, 16, device="mlu:0")
            labels = torch.arange(4, device="mlu:0")
            first, _ = augment(images.clone(), labels, 2, 5)
            torch.randn(1000, device="mlu:0")  # other device draws in between (dropout, ...)
            torch.mlu.manual_seed(99)
            again, _ = augment(images.clone(), labels, 2, 5)
            other, _ = augment(images.clone(), labels, 2, 6)
            print(json.dumps({
                "same": torch.equal(first.cpu(), again.cpu()),
                "differs": not torch.equal(first.cpu(), other.cpu()),
                "erased": bool((first != 0).any()),
            }))
            """,
            mlu_env(),
        )
    )
    assert out["erased"] is True and out["differs"] is True
    assert out["same"] is True


def _stack(line: str | None, replace_scaler: bool = False) -> list[dict]:
    code = f"""
        import json, torch
        from trainer.backend import create_accelerator, device_stack_rows
        accelerator, backend = create_accelerator("mlu", "fp16")
        if {replace_scaler}:
            accelerator.scaler = torch.amp.GradScaler("mlu")  # what the backend did before
        print(json.dumps({{"rows": device_stack_rows("mlu", accelerator, "fp16")}}))
        """
    return last_json(run_python(code, mlu_env(line)))["rows"]


def test_doctor_rows_on_a_matched_stack():
    rows = {r["check"]: r for r in _stack(None)}
    assert list(rows) == ["torch_mlu line", "versions", "loss scaler", "fused SGD", "collective errors", "bf16"]
    assert not [r for r in rows.values() if r["problem"]], rows
    assert "built for torch" in rows["torch_mlu line"]["value"]
    assert rows["loss scaler"]["value"] == "torch_mlu.mlu.amp.GradScaler"
    assert rows["fused SGD"]["value"].startswith("no: ")
    assert "ASYNC_ERROR_HANDLING=1" in rows["collective errors"]["value"]
    assert rows["bf16"]["value"].startswith("not native")


@pytest.mark.skipif(_TORCH < (2, 3), reason="a 2.1 torch_mlu on torch 2.1 is the matched stack")
def test_doctor_flags_a_torch_mlu_built_for_another_torch():
    rows = {r["check"]: r for r in _stack("2.1", replace_scaler=True)}
    assert "built for torch 2.1" in rows["torch_mlu line"]["value"]
    assert "install the torch wheel Cambricon ships" in rows["versions"]["problem"]
    assert "CNCL_ASYNC_ERROR_HANDLING=1" in rows["collective errors"]["value"]
    assert "leave the scaler to Accelerate" in rows["loss scaler"]["problem"]
