"""Failed collectives reworded as one line: rank, step and what was awaited."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainer.collectives import WAITS, CollectiveError, is_collective_failure, named_collective_failures

PACKAGE = Path(__file__).resolve().parent.parent / "trainer"

GLOO_TIMEOUT = (
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
    "Timed out waiting 300000ms for recv operation to complete"
)
GLOO_PEER = (
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:27776: Connection reset by peer."
)


def epoch_over(message: str) -> None:
    raise RuntimeError(message)


def train_step(message: str) -> None:
    raise RuntimeError(message)


@pytest.mark.parametrize(
    ("where", "message", "expected"),
    [
        (
            epoch_over,
            GLOO_TIMEOUT,
            "process 1: step 42: timed out after backend.collective_timeout_s=300 s waiting in the stop agreement",
        ),
        (
            train_step,
            GLOO_PEER,
            "process 1: step 42: lost another process during the gradient all-reduce (DDP backward)",
        ),
        (
            train_step,
            "DataLoader timed out after 300 seconds",
            "process 1: step 42: timed out after "
            "backend.collective_timeout_s=300 s waiting for a batch from the "
            "data loader's workers",
        ),
    ],
)
def test_a_failed_collective_becomes_one_line_naming_rank_step_and_wait(where, message, expected):
    with pytest.raises(CollectiveError) as caught:
        with named_collective_failures(1, lambda: 42, 300):
            where(message)
    text = str(caught.value)
    assert text.startswith(expected) and "\n" not in text and "train.resume=auto" in text, text


def test_other_errors_pass_through_unchanged():
    assert not is_collective_failure(ValueError("bad value"))
    with pytest.raises(KeyError):
        with named_collective_failures(0, lambda: 0, 300):
            raise KeyError("x")


def test_every_wait_names_a_function_the_trainer_defines():
    """A renamed function would silently turn its wait into "a collective in ..."."""
    defined = {
        node.name
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    assert not [name for name, _ in WAITS if name not in defined]


def test_a_stuck_stop_agreement_between_epochs_is_named():
    """`StopAgreement.agreed` (between epochs, after validation) names its wait like the per-step agreement."""
    from types import SimpleNamespace

    from trainer.loop.stop import StopAgreement

    def reduce(tensor, op):
        raise RuntimeError(GLOO_TIMEOUT)

    stop = StopAgreement(SimpleNamespace(num_processes=2, device="cpu", reduce=reduce))
    with pytest.raises(CollectiveError, match="waiting in the stop agreement"):
        with named_collective_failures(0, lambda: 7, 300):
            stop.agreed()
