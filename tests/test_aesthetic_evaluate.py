"""`python -m ernie_jax.aesthetics.evaluate` on tiny benchmarks: its table against scipy, and the LAION scorer
path against transformers' CLIP + a torch head."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import optimize, stats

from conversions.common import run_command
from ernie_jax.aesthetics import evaluate
from tests.test_aesthetic_metrics import vqeg_logistic
from tests.test_laion_head import predictor_normalized, reference_scores, torch_head
from tests.test_vision_towers import CLIP_PREPROCESSOR, TEXT, VISION, randomise, save

CATEGORIES = ("photography", "illustration", "poster")


def write_benchmark(folder, n=60, seed=0):
    """A manifest with two annotators per image (labels 1..10) and a predictions CSV; returns
    (predictions, mean labels, categories) in manifest order."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=n)
    categories = np.array(CATEGORIES)[np.arange(n) % 3]
    labels = np.clip(np.round(5.5 + 2 * quality[:, None] + rng.normal(size=(n, 2))), 1, 10)
    predictions = np.round(3 + np.tanh(quality) + rng.normal(scale=0.3, size=n) + 0.3 * (categories == "poster"), 2)
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "category", "level", "annotator"])
        for annotator in range(2):
            writer.writerows([f"images/{i:03d}.png", categories[i], labels[i, annotator], f"rater{annotator}"]
                             for i in range(n))
    write_predictions(folder / "predictions.csv", [f"images/{i:03d}.png" for i in range(n)], predictions)
    return predictions, labels.mean(axis=1), categories


def write_predictions(path, images, scores):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "score"])
        writer.writerows(zip(images, (repr(float(s)) for s in scores), strict=True))


def read_table(path):
    with open(path, newline="") as f:
        return {(row["scorer"], row["category"]): row for row in csv.DictReader(f)}


def test_table_matches_scipy(tmp_path, capsys):
    predictions, labels, categories = write_benchmark(tmp_path)
    evaluate.main(["--benchmark", str(tmp_path / "manifest.csv"), "--scorer", str(tmp_path / "predictions.csv"),
                   "--out", str(tmp_path / "table.csv"), "--bootstrap", "100"])
    table = read_table(tmp_path / "table.csv")
    assert list(table) == [("predictions", c) for c in ("all", "illustration", "photography", "poster")]
    fit, _ = optimize.curve_fit(vqeg_logistic, predictions, labels, maxfev=20000, xtol=1e-14, ftol=1e-14,
                                p0=[labels.max(), labels.min(), predictions.mean(), predictions.std()])
    residual = vqeg_logistic(predictions, *fit) - labels
    for (_, category), row in table.items():
        chosen = np.ones(len(labels), bool) if category == "all" else categories == category
        pred, label = predictions[chosen], labels[chosen]
        assert int(row["images"]) == chosen.sum()
        assert float(row["srcc"]) == pytest.approx(stats.spearmanr(pred, label).statistic, abs=1e-12)
        assert float(row["plcc"]) == pytest.approx(stats.pearsonr(pred, label).statistic, abs=1e-12)
        assert float(row["kendall_tau_b"]) == pytest.approx(stats.kendalltau(pred, label).statistic, abs=1e-12)
        assert float(row["bias"]) == pytest.approx(residual[chosen].mean(), abs=1e-5)
        for name in ("srcc", "plcc", "plcc_logistic", "kendall_tau_b"):
            assert float(row[f"{name}_low"]) <= float(row[name]) <= float(row[f"{name}_high"])
    # The category's own logistic fit, as curve_fit makes it.
    poster = categories == "poster"
    own, _ = optimize.curve_fit(vqeg_logistic, predictions[poster], labels[poster], maxfev=20000, xtol=1e-14,
                                ftol=1e-14, p0=[labels[poster].max(), labels[poster].min(), predictions[poster].mean(),
                                                predictions[poster].std()])
    expected = stats.pearsonr(vqeg_logistic(predictions[poster], *own), labels[poster]).statistic
    assert float(table[("predictions", "poster")]["plcc_logistic"]) == pytest.approx(expected, abs=1e-6)
    # The predictions favour posters by 0.3 on a scale where the labels' slope is about 2 per unit.
    assert float(table[("predictions", "poster")]["bias"]) > 0.2
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["scorer", "category", "images"] and "poster" in printed


def test_laion_scorer_on_images_equals_reference_predictions(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(3)
    clip = randomise(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=768)), 103)
    save(clip, tmp_path / "clip", CLIP_PREPROCESSOR)
    head = torch_head(1)
    with torch.no_grad():  # a steeper first layer, so that the images' scores spread out
        head.layers[0].weight.mul_(30)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    rng = np.random.default_rng(5)
    (tmp_path / "images").mkdir()
    names = [f"images/{i}.png" for i in range(8)]
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in names]
    for name, picture in zip(names, pictures, strict=True):
        picture.save(tmp_path / name)
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "category", "score"])
        writer.writerows([name, CATEGORIES[i % 2], i % 5 + 1] for i, name in enumerate(names))
    pixels = CLIPImageProcessorPil.from_pretrained(tmp_path / "clip")(images=pictures, return_tensors="pt")
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=pixels["pixel_values"])
    features = getattr(features, "pooler_output", features).numpy()
    write_predictions(tmp_path / "reference.csv", names, reference_scores(head, predictor_normalized(features)))

    evaluate.main(["--benchmark", str(tmp_path / "manifest.csv"), "--bootstrap", "50", "--batch-size", "3",
                   "--scorer", f"laion:{tmp_path / 'clip'},{tmp_path / 'head.pth'}",
                   "--scorer", str(tmp_path / "reference.csv"), "--out", str(tmp_path / "table.csv")])
    table = read_table(tmp_path / "table.csv")
    for category in ("all", *CATEGORIES[:2]):
        ours, reference = table[("laion", category)], table[("reference", category)]
        for column in ("srcc", "kendall_tau_b", "srcc_low", "srcc_high"):
            assert ours[column] == reference[column]
        assert float(ours["plcc"]) == pytest.approx(float(reference["plcc"]), abs=1e-5)


def test_bad_input_is_named(tmp_path, capsys):
    write_benchmark(tmp_path, n=6)
    manifest, predictions = str(tmp_path / "manifest.csv"), str(tmp_path / "predictions.csv")
    cases = {
        "image,category\na.png,x\n": "must have the columns image, category, score or level",
        "image,category,score\na.png,x,7\na.png,x,8\n": "a.png appears twice",
        "image,category,score,annotator\na.png,x,7,r1\na.png,y,8,r2\n": "a.png has categories 'x' and 'y'",
        "image,category,score\na.png,x,seven\n": "'seven' is not a finite number",
    }
    for text, message in cases.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            evaluate.read_manifest(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("image,score\nimages/000.png,1\n")
    with pytest.raises(ValueError, match="no score for 5 benchmark images"):
        evaluate.main(["--benchmark", manifest, "--scorer", str(tmp_path / "short.csv")])
    with pytest.raises(ValueError, match="expected laion:CLIP_FOLDER,HEAD_FILE or a .csv"):
        evaluate.main(["--benchmark", manifest, "--scorer", "model.onnx"])
    assert run_command(evaluate.main, ["--benchmark", manifest, "--scorer", predictions, "--out", manifest]) == 1
    assert "already exists" in capsys.readouterr().err
