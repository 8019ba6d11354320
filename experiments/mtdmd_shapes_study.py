"""MT-DMD on the demo, measured (issue 13): the domain experts against the generalist, and the harness that
scores every teacher, expert and student of the study the same way.

    python -m ernie_jax.main --config experiments/tiny_shapes.py --workdir runs/tiny_shapes
    python -m experiments.mtdmd_shapes_study --base runs/tiny_shapes/pipeline --out runs/mtdmd_study --seeds 0 1 2

The demo's training records are encoded once (`OUT/precompute`); then per seed every variant of
experiments/tiny_shapes_mtdmd.py in `--variants` (the experts and the `generalist_continued` control) is
fine-tuned from the demo pipeline through the runner, the seed changing its draws (records, noise, sigmas)
only. Every row of `ROWS` (a transformer and a sampler setting) is then scored on the same held-out prompts
with the same sampling seeds:
- `domain_scores`: the shapes detector per domain: the first `--per-domain` held-out prompts of each
  category of `shapes.CATEGORIES` (compositions no training caption has);
- `frechet_distance` of `detector_features` to the 50-step CFG teacher's samples of the same prompts drawn
  with other sampling seeds (independent sets: a row sharing the reference's noise would look closer);
- `seconds_per_image` on this machine: the whole pipeline (text encoding, sampling, VAE decoding) on one
  batch of `--batch-size` prompts after a warm-up batch, the same batch size for every row.
The floor of both is the teacher against itself with other sampling seeds (for the distance: the 50-step
teacher's own row). The DMD students (`STUDENT_ROWS`, tiny_shapes_mtdmd.py's `student_*` variants, 8 steps
without CFG) are trained after the experts of their seed: a student's frozen experts are the
`EXPERT-seedSEED/pipeline` exports in `--experts` (default OUT). `--keep-rows` takes the rows of models not
in `--variants` from an earlier study's results.json (the same prompts and seeds), so that students can be
added to a finished study without training its experts again; the teacher's rows are always rescored (from
OUT/samples when there) and timed again beside the new rows. Results go to OUT/results.json and the tables
to `--report`; `--small` runs the whole study at test size (tiny random components).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np

from experiments.dpo_shapes_study import FLOOR_SEEDS, Evaluator, spread, runner
from experiments.tiny_shapes_mtdmd import ABLATIONS, CONTROL, EXPERT_DOMAINS, STUDENTS

CONFIG = "experiments/tiny_shapes_mtdmd.py"
TEACHER = "teacher"
GUIDANCE = 3.0  # the demo's CFG (experiments/tiny_shapes.py: evaluation and sample grids)
# The detector's metric that says most about each domain (shapes_detector.score): the whole scene right
# (every object's colour, shape and cell, and the word) is "all".
DOMAIN_METRICS = {"shapes": "object", "counting": "count", "text": "text"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the tables: `model` ("teacher" or a tiny_shapes_mtdmd variant) sampled with `steps` Euler
    steps at CFG `guidance` (1: no CFG, one transformer call per step)."""

    model: str
    steps: int
    guidance: float

    @property
    def name(self) -> str:
        return f"{self.model}, {self.steps} steps, " + (f"CFG {self.guidance:g}" if self.guidance != 1 else "no CFG")


REFERENCE = Row(TEACHER, 50, GUIDANCE)
# The teacher at 8 steps without CFG is where the students start; at 4 steps with CFG it makes the students' 8
# transformer calls (the sampler a student must beat at equal cost).
ROWS = (REFERENCE, Row(TEACHER, 8, GUIDANCE), Row(TEACHER, 8, 1.0), Row(TEACHER, 4, GUIDANCE),
        *(Row(name, 50, GUIDANCE) for name in (*EXPERT_DOMAINS, CONTROL)))
# The single-teacher DMD2 and the MT-DMD students (and the ablations), 8 steps without CFG as the released Turbo
# samples.
STUDENT_ROWS = tuple(Row(name, 8, 1.0) for name in (*STUDENTS, *ABLATIONS))


def domain_prompts(per_domain: int, side: int = 64) -> list[tuple[str, object]]:
    """The first `per_domain` held-out (prompt, scene) pairs of each category of `shapes.CATEGORIES`, grouped
    by category in that order (held-out scenes are mostly "shapes"; "text" is about 1 in 15)."""
    from ernie_jax.data.shapes import CATEGORIES, ShapesConfig, heldout_prompts

    if per_domain < 1:
        raise ValueError(f"per_domain must be >= 1, got {per_domain}")
    num = 16 * per_domain
    while True:
        heldout = heldout_prompts(ShapesConfig(height=side, width=side), num)
        groups = {c: [pair for pair in heldout if pair[1].category == c][:per_domain] for c in CATEGORIES}
        if all(len(group) == per_domain for group in groups.values()):
            return [pair for c in CATEGORIES for pair in groups[c]]
        num *= 2


def domain_scores(scenes, images: np.ndarray) -> dict[str, dict[str, float]]:
    """`shapes_detector.score_images` per category of the scenes: {category: {metric: score}}."""
    from ernie_jax.evaluation.shapes_detector import score_images

    categories = np.array([scene.category for scene in scenes])
    return {c: score_images([s for s, k in zip(scenes, categories) if k == c], images[categories == c])
            for c in dict.fromkeys(categories)}


def detector_features(images: np.ndarray, grid: int = 3) -> np.ndarray:
    """The mean coverage of each palette colour and of the text colour in each cell of a `grid` x `grid`
    partition (the shapes detector's segmentation, `shapes_detector.segment`): which colours lie where, and
    how solidly. uint8 `[N, H, W, 3]` -> float64 `[N, grid * grid * (colours + 1)]` (45 with the defaults)."""
    from ernie_jax.evaluation.shapes_detector import segment

    features = []
    for image in images:
        coverage = segment(image)[1]  # [H, W, C + 1]
        height, width = coverage.shape[:2]
        cells = coverage[:height - height % grid, :width - width % grid].reshape(
            grid, height // grid, grid, width // grid, -1)
        features.append(cells.mean(axis=(1, 3)).reshape(-1))
    return np.asarray(features, np.float64)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) between Gaussians fitted to `[N, D]` and `[M, D]`."""
    from scipy import linalg

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"frechet_distance: needs two [N, D] sets of one D and N >= 2, got {x.shape}, {y.shape}")
    covariance_x, covariance_y = (np.atleast_2d(np.cov(v, rowvar=False)) for v in (x, y))
    with warnings.catch_warnings():  # singular whenever a feature is constant or N <= D; the root still exists
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(covariance_x @ covariance_y)
    # The product of two PSD matrices has a real square root; sqrtm returns round-off as imaginary parts.
    trace = np.trace(covariance_x) + np.trace(covariance_y) - 2 * np.trace(np.real(root))
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + max(trace, 0.0))


def seconds_per_image(evaluator: Evaluator, transformer, repeats: int = 2) -> float:
    """Wall seconds per image of the whole pipeline on one batch of the evaluator's first prompts, after a
    warm-up batch (compiles), averaged over `repeats` batches."""
    pipe = evaluator.pipeline(transformer)
    prompts = evaluator.prompts[:evaluator.batch_size]
    evaluator.sample(pipe, prompts, seed=0)
    start = time.perf_counter()
    for repeat in range(repeats):
        evaluator.sample(pipe, prompts, seed=1 + repeat)
    return (time.perf_counter() - start) / (repeats * len(prompts))


def score_samples(scenes, images: np.ndarray, reference_features: np.ndarray | None) -> dict:
    """Per-domain detector scores of `images` (uint8 `[N, H, W, 3]`, one per scene), their features, and their
    Fréchet distance to `reference_features` (None: not measured)."""
    features = detector_features(images)
    return {"domains": domain_scores(scenes, images), "features": features,
            "frechet": None if reference_features is None else frechet_distance(features, reference_features)}


def evaluate_row(evaluator: Evaluator, transformer, reference_features: np.ndarray | None) -> dict:
    """`score_samples` of `transformer`'s samples of the evaluator's prompts."""
    return score_samples(evaluator.scenes, evaluator(transformer)["images"], reference_features)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.mtdmd_shapes_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the trained demo pipeline folder (not needed with --small)")
    parser.add_argument("--out", required=True, help="work folder (runs resume in it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+",
                        default=sorted({r.model for r in (*ROWS, *STUDENT_ROWS)} - {TEACHER}))
    parser.add_argument("--experts", default=None, help="folder of the expert runs the students read "
                        "(EXPERT-seedSEED/pipeline; default OUT)")
    parser.add_argument("--keep-rows", default=None, help="an earlier study's results.json: its rows of models "
                        "not in --variants are kept")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning updates (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run this invocation trains (repeatable), for example "
                        "train.optimizer.learning_rate=2e-4; recorded in results.json")
    parser.add_argument("--per-domain", type=int, default=48, help="held-out prompts per category")
    parser.add_argument("--batch-size", type=int, default=16, help="sampling batch (and the timed batch)")
    parser.add_argument("--timing-repeats", type=int, default=2, help="timed batches per row")
    parser.add_argument("--report", default=None, help="markdown tables (default OUT/report.md)")
    parser.add_argument("--small", action="store_true", help="test size: tiny random components, 2-step sampling")
    args = parser.parse_args(argv)
    known = sorted({row.model for row in (*ROWS, *STUDENT_ROWS)} - {TEACHER})
    unknown = sorted(set(args.variants) - set(known))
    if unknown:
        parser.error(f"--variants {unknown}: not variants of the study (known: {', '.join(known)})")
    for override in args.overrides:
        if "=" not in override:
            parser.error(f"--set {override!r}: expected FIELD=VALUE, e.g. train.optimizer.learning_rate=2e-4")
    out = Path(args.out)
    prefix = "tiny_" if args.small else ""
    # The demo's records, encoded once by the base's VAE and text encoder (with --small, made from the tiny
    # random components this run also writes).
    precompute = out / "precompute"
    base_overrides = [] if args.small else [f"--config.components.path={Path(args.base).resolve()}"]
    runner(precompute, f"{CONFIG}:{prefix}{CONTROL}",
           [*base_overrides, f"--config.stages={('components', 'precompute') if args.small else ('precompute',)}"])
    base = (precompute / "components") if args.small else Path(args.base).resolve()
    folders = tuple(str(f) for f in sorted((precompute / "precomputed").glob("*/shard-*")))
    common = [f"--config.components.path={base}", "--config.components.kind=pretrained",
              "--config.stages=('ode_pairs','train','export')", f"--config.data.precomputed={folders}"]
    common += [f"--config.{override}" for override in args.overrides]
    if args.steps:
        common += [f"--config.data.stage_steps=({args.steps},)", f"--config.train.optimizer.decay_steps={args.steps}",
                   f"--config.train.checkpoint_every={args.steps}", f"--config.evals.samples.every={args.steps}",
                   f"--config.evals.eval.every={args.steps}"]

    from conversions.transformer import load_transformer

    heldout = domain_prompts(2 if args.small else args.per_domain)
    evaluators = {}

    def evaluator(row: Row) -> Evaluator:
        steps = 2 if args.small else row.steps
        if (steps, row.guidance) not in evaluators:
            evaluators[steps, row.guidance] = Evaluator(base, len(heldout), steps, row.guidance, "shapes", 64,
                                                        args.batch_size, heldout)
        return evaluators[steps, row.guidance]

    results_path = out / "results.json"
    results = {"prompts": len(heldout), "per_domain": len(heldout) // len(DOMAIN_METRICS), "rows": {},
               "seconds_per_image": {}, "run_seconds": {}, "overrides": args.overrides, "steps": args.steps}
    scenes = evaluator(REFERENCE).scenes

    def samples(row: Row, transformer, tag: str, seed_offset: int = 0) -> np.ndarray:
        """The row's images of the held-out prompts, kept in OUT/samples (a rerun rescores them)."""
        path = out / "samples" / f"{tag}.npz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, images=evaluator(row)(transformer, seed_offset)["images"])
        return np.load(path)["images"]

    # The reference set has sampling seeds of its own: a distribution distance compares independent samples
    # (a row sampled from the reference's own noise would look closer than another draw of the teacher).
    teacher = load_transformer(base / "transformer", "float32")
    reference = score_samples(scenes, samples(REFERENCE, teacher, "teacher-reference", FLOOR_SEEDS), None)
    results["floor"] = {"domains": reference["domains"]}
    models = {}  # row name -> the transformer that the speed is measured with (the first seed's)

    def record(row: Row, transformer, tag: str, seed) -> None:
        got = score_samples(scenes, samples(row, transformer, tag), reference["features"])
        results["rows"].setdefault(row.name, []).append({"seed": seed, "domains": got["domains"],
                                                         "frechet": got["frechet"]})
        models.setdefault(row.name, (row, transformer))
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    rows = [row for row in (*ROWS, *STUDENT_ROWS) if row.model == TEACHER or row.model in args.variants]
    experts = Path(args.experts) if args.experts else out
    for row in rows:
        if row.model == TEACHER:
            record(row, teacher, f"teacher-{row.steps}" + ("" if row.guidance == GUIDANCE else "-nocfg"), None)
    if args.keep_rows:
        earlier = json.loads(Path(args.keep_rows).read_text())
        if earlier["prompts"] != results["prompts"]:
            raise ValueError(f"--keep-rows {args.keep_rows}: {earlier['prompts']} prompts, this study "
                             f"{results['prompts']}")
        kept = {row.name for row in (*ROWS, *STUDENT_ROWS) if row.model not in (TEACHER, *args.variants)}
        results["rows"].update({name: entries for name, entries in earlier["rows"].items() if name in kept})
        results["seconds_per_image"].update({name: value for name, value in earlier["seconds_per_image"].items()
                                             if name in kept})
    for seed in args.seeds:
        for row in rows:
            if row.model == TEACHER:
                continue
            run = out / f"{row.model}-seed{seed}"
            frozen = []
            for expert in dict.fromkeys(STUDENTS.get(row.model, {}).values()):
                pipeline = experts / f"{expert}-seed{seed}" / "pipeline"
                if not (pipeline / "transformer").is_dir():
                    raise FileNotFoundError(f"{row.model} reads the expert {expert!r}: no {pipeline}/transformer "
                                            f"(train it with --variants {expert}, or point --experts at its runs)")
                frozen.append(f"--config.frozen.{expert}.path={pipeline.resolve()}")
            start = time.perf_counter()
            runner(run, f"{CONFIG}:{prefix}{row.model}", [*common, f"--config.seed={seed}", *frozen])
            results["run_seconds"][run.name] = time.perf_counter() - start
            record(row, load_transformer(run / "pipeline" / "transformer", "float32"), run.name, seed)
    # Last and back to back, so that the rows share the machine's state.
    for name, (row, transformer) in models.items():
        results["seconds_per_image"][name] = seconds_per_image(evaluator(row), transformer, args.timing_repeats)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    report = Path(args.report) if args.report else out / "report.md"
    report.write_text(tables(results, args))
    print(f"wrote {report} and {results_path}")


def tables(results: dict, args) -> str:
    """The per-domain scores, the Fréchet distances and the speed of every row, mean ± sd over seeds."""
    domains = list(DOMAIN_METRICS)
    floor = results["floor"]
    header = " | ".join(f"{d}: all | {d}: {DOMAIN_METRICS[d]}" for d in domains)
    # Kept rows (--keep-rows) may have other seeds than this run's.
    seeds = sorted({e["seed"] for entries in results["rows"].values() for e in entries if e["seed"] is not None})
    lines = [(f"Fine-tuning seeds {seeds} (this run's {args.seeds}); {results['per_domain']} held-out prompts per "
              f"domain, the same prompts and sampling seeds for every row; mean ± standard deviation over "
              f"fine-tuning seeds."), "",
             f"| row | {header} | Fréchet distance to the teacher (50 steps) | s / image |",
             "|---|" + "---|" * (2 * len(domains) + 2)]

    def cells(entries) -> list[str]:
        return [spread(e["domains"][d][m] for e in entries) for d in domains for m in ("all", DOMAIN_METRICS[d])]

    for name, entries in results["rows"].items():
        seconds = results["seconds_per_image"].get(name)
        lines.append(f"| {name} | {' | '.join(cells(entries))} | {spread(e['frechet'] for e in entries)} | "
                     f"{'-' if seconds is None else f'{seconds:.4f}'} |")
    lines.append(f"| teacher, 50 steps, CFG {GUIDANCE:g}, other sampling seeds (the reference set; the floor) | "
                 f"{' | '.join(cells([floor]))} | 0 | - |")
    lines += ["", ("Each expert in its own domain against the generalist (the teacher, and the teacher continued "
                   "for the experts' updates on every category), per fine-tuning seed; the floor is the teacher "
                   "with other sampling seeds minus the teacher:"), "",
              "| expert | domain | metric | expert | minus teacher | minus generalist continued | floor |",
              "|---|---|---|---|---|---|---|"]
    teacher = results["rows"][REFERENCE.name][0]["domains"]
    control = {e["seed"]: e["domains"] for e in results["rows"].get(Row(CONTROL, 50, GUIDANCE).name, [])}
    for expert, domain in EXPERT_DOMAINS.items():
        entries = results["rows"].get(Row(expert, 50, GUIDANCE).name, [])
        if not entries:
            continue
        for metric in ("all", DOMAIN_METRICS[domain]):
            got = [e["domains"][domain][metric] for e in entries]
            over_control = [e["domains"][domain][metric] - control[e["seed"]][domain][metric]
                            for e in entries if e["seed"] in control]
            lines.append(f"| {expert} | {domain} | {metric} | {spread(got)} | "
                         f"{spread(v - teacher[domain][metric] for v in got)} | {spread(over_control)} | "
                         f"{floor['domains'][domain][metric] - teacher[domain][metric]:+.3f} |")
    lines += student_table(results)
    lines += ablation_table(results)
    return "\n".join(lines) + "\n"


def student_table(results: dict) -> list[str]:
    """The students per domain beside the teacher at 50 and at 8 Euler steps (with CFG), the teacher at 8 steps without
    CFG (where they start), and MT-DMD minus DMD2 paired by seed; empty until both students have rows."""
    dmd2, mtdmd = (results["rows"].get(Row(name, 8, 1.0).name, []) for name in STUDENTS)
    if not (dmd2 and mtdmd):
        return []
    teacher = results["rows"][REFERENCE.name][0]["domains"]
    euler = results["rows"][Row(TEACHER, 8, GUIDANCE).name][0]["domains"]
    start = results["rows"][Row(TEACHER, 8, 1.0).name][0]["domains"]
    floor = results["floor"]["domains"]
    by_seed = {e["seed"]: e["domains"] for e in dmd2}
    equal_calls = results["rows"].get(Row(TEACHER, 4, GUIDANCE).name)
    lines = ["", ("The students (8 steps, no CFG) per domain beside the teacher with CFG at 50 and at 8 Euler steps, "
             "without CFG at 8 and with CFG at 4 (both the students' 8 transformer calls); MT-DMD minus DMD2 paired "
             "by training seed; the floor is the teacher with other sampling seeds minus the teacher:"), "",
             ("| domain | metric | teacher 50 | teacher 8 Euler | teacher 8, no CFG | teacher 4 Euler | DMD2 | "
              "MT-DMD | MT-DMD minus DMD2 | floor |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for domain, metric in DOMAIN_METRICS.items():
        for name in ("all", metric):
            paired = [e["domains"][domain][name] - by_seed[e["seed"]][domain][name] for e in mtdmd
                      if e["seed"] in by_seed]
            four = "-" if equal_calls is None else f"{equal_calls[0]['domains'][domain][name]:.3f}"
            lines.append(f"| {domain} | {name} | {teacher[domain][name]:.3f} | {euler[domain][name]:.3f} | "
                         f"{start[domain][name]:.3f} | {four} | "
                         f"{spread(e['domains'][domain][name] for e in dmd2)} | "
                         f"{spread(e['domains'][domain][name] for e in mtdmd)} | {spread(paired)} | "
                         f"{floor[domain][name] - teacher[domain][name]:+.3f} |")
    return lines


def ablation_table(results: dict) -> list[str]:
    """Each ablation minus the student it changes, paired by training seed (the seed fixes the records and every
    draw of both runs), per domain and on the Fréchet distance; empty until an ablation has rows."""
    columns = [(domain, name) for domain, metric in DOMAIN_METRICS.items() for name in ("all", metric)]
    lines = []
    for ablation, (student, fields) in ABLATIONS.items():
        changed = {e["seed"]: e for e in results["rows"].get(Row(ablation, 8, 1.0).name, [])}
        base = {e["seed"]: e for e in results["rows"].get(Row(student, 8, 1.0).name, []) if e["seed"] in changed}
        if not base:
            continue
        if not lines:
            lines = ["", "Each ablation minus the student it changes, paired by training seed (8 steps, no CFG):", "",
                     f"| ablation | fields | seeds | {' | '.join(f'{d}: {n}' for d, n in columns)} | Fréchet |",
                     "|---|---|---|" + "---|" * (len(columns) + 1)]
        seeds = sorted(base)
        differences = [spread(changed[s]["domains"][d][n] - base[s]["domains"][d][n] for s in seeds)
                       for d, n in columns]
        frechet = spread(changed[s]["frechet"] - base[s]["frechet"] for s in seeds)
        lines.append(f"| {ablation} minus {student} | {fields} | {seeds} | {' | '.join(differences)} | {frechet} |")
    return lines


if __name__ == "__main__":
    main()
