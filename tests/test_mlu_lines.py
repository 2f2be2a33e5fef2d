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
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
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
                loss = model(torch.randn(8, 4, device=accelerator.device)).float().pow(2).mean()
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
