"""trainer predict: top-k classes per image through the val pipeline, as a table, JSON or CSV; bad images skipped."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from test_train import fit, tiny_config

import helpers
from trainer.__main__ import main
from trainer.predict import expand_images

TIMM_LOCAL_DIR = tuple(int(v) for v in timm.__version__.split(".")[:3] if v.isdigit()) >= (1, 0, 16)
SYNSETS = ["n01440764", "n02102040", "n02979186"]  # tench, English springer, cassette player


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One epoch of test_resnet at 16 px on 3 ImageNet-named classes, with an EMA."""
    tmp = tmp_path_factory.mktemp("predict")
    helpers.make_image_folder(tmp / "data", names=SYNSETS)
    overrides = ("output.run_name=r", "train.epochs=1", "ema.enabled=true", "ema.decay=0.5", "input.crop_pct=0.875")
    trainer, _ = fit(tiny_config(tmp, *overrides))
    return trainer, tmp / "runs" / "r", tmp / "data" / "val"


def run_predict(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def expected_probabilities(trainer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Softmax of `model` on each val image as the training run's own val dataset transforms it."""
    dataset, probs = trainer.data.val, {}
    model = model.eval()
    for i in range(len(dataset)):
        image, _ = dataset[(0, i)]
        with torch.no_grad():
            logits = model(trainer.normalize(image.unsqueeze(0)))
        probs[dataset.reader.read(i).name] = logits.float().softmax(1)[0]
    return probs


def test_predictions_are_the_val_pipelines_with_names_and_bad_images_skipped(trained, capsys, tmp_path: Path):
    trainer, run, val = trained
    images = tmp_path / "images"
    shutil.copytree(val, images)
    (images / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    absent = str(tmp_path / "absent.jpg")
    code, out, err = run_predict(capsys, str(run / "model"), str(images), absent, "--json", "--top-k", "2")
    assert code == 0
    document = json.loads(out)
    assert set(document) == {"model", "images", "predicted", "skipped", "predictions"}
    assert document["images"] == 11 and document["predicted"] == 9 and len(document["skipped"]) == 2
    assert {Path(s["image"]).name for s in document["skipped"]} == {"broken.JPEG", "absent.jpg"}
    assert all(isinstance(s["reason"], str) and s["reason"] for s in document["skipped"])
    assert "broken.JPEG" in err and "2 of 11 images skipped" in err
    expected = expected_probabilities(trainer, trainer.accelerator.unwrap_model(trainer.model))
    for row in document["predictions"]:
        assert [c["rank"] for c in row["top"]] == [1, 2]
        reference = expected[str(val / Path(row["image"]).relative_to(images))]
        top = reference.topk(2)
        assert [c["index"] for c in row["top"]] == top.indices.tolist()
        assert [c["probability"] for c in row["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        for c in row["top"]:
            assert c["label"] == SYNSETS[c["index"]] and c["description"]  # ImageNet synsets are described
    described = {"tench, Tinca tinca", "English springer, English springer spaniel", "cassette player"}
    assert document["predictions"][0]["top"][0]["description"] in described


def test_ema_weights_from_a_run_or_a_checkpoint(trained, capsys):
    trainer, run, val = trained
    image = next(val.rglob("*.JPEG"))
    checkpoint = next((run / "checkpoints").iterdir())
    ema = expected_probabilities(trainer, trainer.ema.module)[str(image)]
    for model in (run, checkpoint):
        code, out, _ = run_predict(capsys, str(model), str(image), "--ema", "--json", "--top-k", "3")
        probabilities = {c["index"]: c["probability"] for c in json.loads(out)["predictions"][0]["top"]}
        assert code == 0 and [probabilities[i] for i in range(3)] == pytest.approx(ema.tolist(), abs=1e-5)


def test_table_for_people_and_csv_for_scripts(trained, capsys):
    _, run, val = trained
    pattern = str(val / "*" / "*.JPEG")
    code, out, _ = run_predict(capsys, str(run), pattern, "--top-k", "1")
    assert code == 0 and out.count("\n") == 2 * 9
    assert any(name in out for name in ("tench, Tinca tinca (n01440764)", "cassette player (n02979186)", "springer"))
    code, out, _ = run_predict(capsys, str(run), pattern, "--csv", "--top-k", "3")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 27
    assert set(rows[0]) == {"image", "rank", "index", "label", "description", "probability"}
    assert sum(float(r["probability"]) for r in rows[:3]) == pytest.approx(1.0, abs=1e-4)


def test_nothing_readable_is_one_line(trained, capsys, tmp_path: Path):
    _, run, _ = trained
    (tmp_path / "a.jpg").write_bytes(b"")
    code, _, err = run_predict(capsys, str(run), str(tmp_path / "a.jpg"))
    assert code == 2 and "skipped" in err
    assert err.strip().splitlines()[-1].startswith("trainer: error: none of the 1 images could be read")
    code, _, err = run_predict(capsys, str(run), str(tmp_path / "*.png"))
    assert code == 2 and err.count("\n") == 1 and "no image found" in err
    code, _, err = run_predict(capsys, str(tmp_path), str(tmp_path / "a.jpg"))
    assert code == 2 and err.count("\n") == 1 and "neither a model folder" in err


def test_expand_images_keeps_order_and_names_what_matched_nothing(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jpg", "d/sub/a.png", "d/notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    files, missing = expand_images([str(tmp_path / p) for p in ("c.webp", "d", "*.webp", "none*.jpg")])
    assert files == [str(tmp_path / p) for p in ("c.webp", "d/b.jpg", "d/sub/a.png")]
    assert missing == [(str(tmp_path / "none*.jpg"), "no image found")]


def test_an_hf_datasets_class_label_names_name_the_outputs(tmp_path: Path):
    import datasets

    names = ["cat", "dog", "bird"]
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    for split, ds in helpers.make_hf_splits().items():
        ds = ds.cast_column("label", datasets.Value("int64")).cast_column("label", datasets.ClassLabel(names=names))
        ds.to_parquet(str(tmp_path / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    overrides = ("output.run_name=hf", "train.epochs=1", "data.source=hf", f"data.root={tmp_path / 'parquet'}")
    fit(tiny_config(tmp_path, *overrides))
    config = json.loads((tmp_path / "runs" / "hf" / "model" / "config.json").read_text())
    assert config["label_names"] == names and "label_descriptions" not in config


@pytest.mark.slow
@pytest.mark.skipif(not TIMM_LOCAL_DIR, reason="timm's local-dir: loading needs timm 1.0.16 or later")
def test_the_cli_trains_predicts_and_a_fresh_python_loads_the_folder_in_timm(tmp_path: Path):
    import subprocess
    import sys

    from test_cli_e2e import run_cli
    from test_cli_e2e import tiny_config as cli_config

    root = helpers.make_image_folder(tmp_path / "imagenet", names=SYNSETS)
    run_cli("train", "--config", str(cli_config(tmp_path, {"root": str(root)}, train={"epochs": 1})))
    run = tmp_path / "runs" / "tiny"
    document = json.loads(run_cli("predict", str(run), str(root / "val"), "--json", "--top-k", "1").stdout)
    assert document["predicted"] == 9 and not document["skipped"]
    assert {row["top"][0]["label"] for row in document["predictions"]} <= set(SYNSETS)
    # nothing of the trainer imported, nothing typed but the folder
    code = (
        "import json, sys, timm\n"
        "m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True)\n"
        "size = timm.data.resolve_data_config({}, model=m)['input_size']\n"
        "print(json.dumps([m.num_classes, m.pretrained_cfg['label_names'], size]))"
    )
    command = [sys.executable, "-c", code, str(run / "model")]
    loaded = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(loaded.stdout.splitlines()[-1]) == [3, SYNSETS, [3, 32, 32]]
