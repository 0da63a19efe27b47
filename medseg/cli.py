"""Command-line interface: ``medseg <stage> [options]``.

Each stage is usable on its own; the Snakemake rules call these commands.
Exit status: 0 success, 1 some inputs failed (listed at the end and in a
failures file), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medseg import __version__
from medseg.errors import DeviceUnavailable

log = logging.getLogger("medseg")

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class UsageError(Exception):
    """Bad arguments found after parsing (exit status 2)."""


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _label_values(text: str) -> dict[int, str]:
    """'1=heart,2=left_lung' -> {1: 'heart', 2: 'left_lung'}."""
    table = {}
    for item in _csv_list(text):
        value, _, name = item.partition("=")
        if not name or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected VALUE=STRUCTURE, got {item!r}")
        table[int(value)] = name.strip()
    return table


def _label_groups(text: str) -> dict[str, list[str]]:
    """'{"lungs": ["left_lung", "right_lung"]}' -> {"lungs": ["left_lung", "right_lung"]}."""
    try:
        groups = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(groups, dict) or not groups:
        raise argparse.ArgumentTypeError(f'expected a JSON object of label groups, e.g. {{"lungs": ["left_lung", '
                                         f'"right_lung"]}}, got {text!r}')
    for name, group in groups.items():
        if not name.strip():
            raise argparse.ArgumentTypeError(f"label names must not be empty, got {text!r}")
        if (not isinstance(group, list) or not group
                or not all(isinstance(s, str) and s.strip() for s in group)):
            raise argparse.ArgumentTypeError(f"label {name!r}: expected a non-empty list of structure names, "
                                             f"got {json.dumps(group)}")
    return groups


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _positive_mm(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of mm, got {text}")
    return value


def _chunk(text: str):
    from medseg.inference.predict import Chunk

    try:
        return Chunk.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_read_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reading images (PNG/JPEG/TIFF carry no polarity or spacing; --no-voi: DICOM)")
    group.add_argument("--invert", action="store_true",
                       help="PNG/JPEG/TIFF are stored white-is-zero (bone dark), e.g. the JSRT PNGs")
    group.add_argument("--pixel-spacing", type=_positive_mm, default=None, metavar="MM",
                       help="pixel spacing for PNG/JPEG/TIFF, and fallback for DICOM without one (spacing_source "
                            "'given'); without it 1.0 mm is assumed (spacing_source 'assumed', with a warning). "
                            "The plausibility check and the sizes in mm need the true value, e.g. 0.35 for the "
                            "JSRT PNGs")
    group.add_argument("--no-voi", action="store_true",
                       help="DICOM only: do not apply the file's VOI LUT / window (raw Modality LUT values)")


def _read_options(args: argparse.Namespace):
    from medseg.ingest.types import ReadOptions

    return ReadOptions(invert=args.invert, pixel_spacing_mm=args.pixel_spacing, apply_voi=not args.no_voi)


def cmd_phantoms(args: argparse.Namespace) -> int:
    from medseg.phantoms.write import write_phantom_dataset

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log.info("phantoms %d/%d", done, total)

    ids = write_phantom_dataset(
        Path(args.out), n=args.n, seed=args.seed, shape=(args.height, args.width),
        pixel_spacing_mm=args.pixel_spacing, progress=progress,
    )
    log.info("wrote %d phantoms to %s", len(ids), args.out)
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    """Read files and print what the pipeline sees (one JSON line each)."""
    from medseg.batch import report_failures, run_batch
    from medseg.ingest import load_image

    inputs = _collect(args.inputs, args.case_id_from)
    options = _read_options(args)

    def describe(entry) -> dict:
        image = load_image(entry.path, options)
        return {
            "case_id": entry.case_id,
            "input_name": entry.name,
            "source": image.source,
            "format": image.source_format,
            "shape": list(image.shape),
            "spacing_mm": list(image.spacing_mm),
            "spacing_source": image.spacing_source,
            "spacing_plane": image.spacing_plane,
            "photometric": image.photometric,
            "exif_orientation": image.extra.get("exif_orientation"),
            "min": float(image.pixels.min()),
            "max": float(image.pixels.max()),
        }

    results, failures = run_batch(inputs.files, describe, label="ingest", name_of=lambda entry: str(entry.path))
    for record in results:
        print(json.dumps(record, ensure_ascii=False))
    _warn_assumed_spacing("ingest", [record["spacing_source"] for record in results])
    report_failures(failures, len(inputs.files), "ingest", skipped=len(inputs.skipped))
    return EXIT_FAILURES if failures else EXIT_OK


def _warn_assumed_spacing(label: str, sources: Sequence[str]) -> None:
    """One warning for the batch when some inputs were read with the assumed spacing."""
    from medseg.ingest.types import SPACING_ASSUMED, assumed_spacing_warning

    assumed = sum(source == SPACING_ASSUMED for source in sources)
    if assumed:
        log.warning("%s: %s", label, assumed_spacing_warning(assumed, len(sources)))


def _collect(inputs: Sequence[str], case_id_from: str = "filename", exclude: Sequence[str] = (), connection=None,
             whole_archive: bool = False):
    """The run's inputs with their case IDs; a bad list file or an input
    path that does not exist is bad usage (ValueError here, FileNotFoundError
    in main: exit 2, naming the path, before anything is read or written).
    DICOMweb sources are listed through ``connection``
    (:class:`medseg.dicomweb.Connection`); a refused or failed search is bad
    usage too (wrong credentials are said at once, not once per scan), and
    so is a search of the whole archive (no filter) unless ``whole_archive``."""
    from medseg.dicomweb import DicomWebError, DicomWebSource
    from medseg.ingest.inputs import collect_inputs
    from medseg.ingest.remote import list_instances

    def remote(text: str):
        source = DicomWebSource.parse(text)
        if source.whole_archive and not whole_archive:  # with --push, it would write into every study
            raise ValueError(f"DICOMweb source {source.display()} has no filter: it reads every image on the server "
                             "(the whole archive); narrow it (e.g. /series?Modality=CR, /studies?StudyDate=20240101-"
                             "20240131) or, if the whole archive is meant, give --whole-archive")
        if source.optional_filters:
            log.warning("DICOMweb source %s: %s is not among the attributes every server must match (PS3.18 "
                        "10.6.1.2.3): a server that does not match it ignores it and the search reads more than "
                        "meant; check the count below", source.display(), ", ".join(source.optional_filters))
        files, skipped = list_instances(connection, source)
        if source.search is None and not files and not skipped:  # UIDs that name nothing: a typo, as a missing path
            raise DicomWebError(f"DICOMweb source {source.display()}: no such study, series or instance on the server")
        log.info("DICOMweb source %s: %d image instance(s), %d other instance(s) skipped", source.display(),
                 len(files), len(skipped))
        return files, skipped

    try:
        return collect_inputs(inputs, case_id_from, exclude=exclude, remote=remote if connection else None)
    except (ValueError, DicomWebError) as err:
        raise UsageError(str(err)) from None


def _dicomweb_connection(args: argparse.Namespace):
    """The DICOMweb connection of a run whose inputs or --push need one (credentials:
    :func:`medseg.dicomweb.credentials_from_environment`), else None."""
    from medseg.dicomweb import Connection, is_dicomweb_source

    needed = getattr(args, "push", False) or getattr(args, "push_url", None) or any(
        is_dicomweb_source(item) or _lists_urls(item) for item in args.inputs)
    if not needed:
        return None
    try:
        connection = Connection.from_environment(getattr(args, "dicomweb_auth", None))
    except ValueError as err:
        raise UsageError(str(err)) from None
    log.info("DICOMweb credentials: %s", connection.source)
    return connection


def _searches(inputs: Sequence[str]) -> bool:
    """Some input is a DICOMweb search (its result can change between runs)."""
    from medseg.dicomweb import DicomWebSource, is_dicomweb_source

    for item in inputs:
        if is_dicomweb_source(item):
            try:
                if DicomWebSource.parse(item).search is not None:
                    return True
            except ValueError:
                continue
    return False


def _shown_inputs(inputs: Sequence[str]) -> str:
    """The inputs for a log line: DICOMweb sources without query values (a
    search may be by patient) or credentials."""
    from medseg.dicomweb import is_dicomweb_source, redact_url

    return " ".join(redact_url(i) if is_dicomweb_source(i) else i for i in inputs)


def _lists_urls(item: str) -> bool:
    """A list file (.txt) with DICOMweb instance URLs (as list-inputs writes them)."""
    path = Path(item)
    if path.suffix.lower() != ".txt" or not path.is_file():
        return False
    try:
        with path.open(errors="replace") as handle:
            return any(line.lstrip().lower().startswith(("http://", "https://")) for line in handle)
    except OSError:
        return False


def cmd_preprocess(args: argparse.Namespace) -> int:
    from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset

    try:
        spec = DatasetSpec(
            images=Path(args.images),
            masks_root=Path(args.masks) if args.masks else None,
            mask_format=args.mask_format,
            structures=tuple(args.structures),
            label_values=args.label_values or {},
            read_options=_read_options(args),
            case_id_from=args.case_id_from,
        )
    except ValueError as err:
        log.error("%s", err)
        return EXIT_USAGE
    settings = PreprocessSettings(size=args.size, lower_percentile=args.lower_percentile,
                                  upper_percentile=args.upper_percentile)
    result = preprocess_dataset(spec, settings, args.out, workers=args.workers)
    log.info("manifest: %s (%d cases); failures: %s (%d)", result.manifest_path, len(result.rows),
             result.failures_path, len(result.failures))
    if result.failures and not args.tolerate_failures:
        return EXIT_FAILURES
    return EXIT_OK


def cmd_split(args: argparse.Namespace) -> int:
    from medseg.preprocessing.manifest import read_manifest
    from medseg.preprocessing.splits import make_splits, write_splits

    case_ids = read_manifest(args.manifest)["case_id"].tolist()
    try:
        splits = make_splits(case_ids, args.scheme, k=args.k, seed=args.seed, val_fraction=args.val_fraction)
    except ValueError as err:
        log.error("%s: %s", args.manifest, err)
        return EXIT_USAGE
    write_splits(args.out, splits)
    for fold in splits["folds"]:
        log.info("fold %d: %d train, %d val, %d test", fold["fold"], len(fold["train"]), len(fold["val"]), len(fold["test"]))
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    from medseg.preprocessing.preview import preview_manifest

    labels = args.labels
    n = preview_manifest(args.manifest, args.out, max_cases=args.max_cases, **({"labels": labels} if labels else {}))
    log.info("drew %d cases into %s", n, args.out)
    return EXIT_OK


def _load_config(path: str) -> dict:
    """The workflow config (config/config.yaml or a run's resolved config.json)."""
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a config mapping")
    return config


def _config_from_args(args: argparse.Namespace) -> dict:
    """--config FILE or --config-json TEXT (the workflow passes the sections a
    stage depends on as text, so unrelated config changes do not rerun it)."""
    if getattr(args, "config_json", None):
        config = json.loads(args.config_json)
        if not isinstance(config, dict):
            raise ValueError("--config-json: not a mapping")
        return config
    if not args.config:
        raise ValueError("give --config FILE or --config-json TEXT")
    return _load_config(args.config)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="workflow config (config/config.yaml or a resolved copy)")
    group.add_argument("--config-json", help="the same, as JSON text")


def _tracking_target(config: dict, tracking_uri: str | None):
    from medseg.tracking import default_tracking_uri
    from medseg.training.run import TrackingTarget

    section = config.get("mlflow") or {}
    dataset = config.get("dataset", "dataset")
    return TrackingTarget(
        tracking_uri=default_tracking_uri(tracking_uri or section.get("tracking_uri")),
        experiment=section.get("experiment") or dataset,
        registered_model=section.get("registered_model") or f"medseg-{dataset}",
        alias=section.get("alias") or "candidate",
        system_metrics=bool(section.get("system_metrics", True)),
    )


def _train_settings(config: dict, args: argparse.Namespace):
    from medseg.training.settings import TrainSettings

    values = dict(config.get("train") or {})
    for key in ("epochs", "batch_size", "network", "preset", "upsample", "device", "seed", "learning_rate"):
        override = getattr(args, key, None)
        if override is not None:
            values[key] = override
    return TrainSettings.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from medseg.errors import InputError, SettingsMismatch
    from medseg.tracking import TrackingUnavailable, flatten
    from medseg.training.run import train_fold

    try:
        config = _config_from_args(args)
        settings = _train_settings(config, args)
        labels = config.get("labels") or {}
        if not labels:
            raise ValueError("the config has no 'labels' section")
    except (ValueError, TypeError, OSError) as err:
        log.error("refusing to train: %s", err)
        return EXIT_USAGE
    target = _tracking_target(config, args.tracking_uri)
    parent = None
    if args.parent_run_file:
        parent = json.loads(Path(args.parent_run_file).read_text())["parent_run_id"]
    resolved = {**config, "train": settings.to_dict()}
    try:
        summary = train_fold(
            settings=settings, labels=labels, manifest=args.manifest, splits=args.splits, fold=args.fold,
            out_dir=args.out, target=target, params=flatten(resolved), config=resolved,
            parent_run_id=parent, intensity={k: v for k, v in (config.get("preprocess") or {}).items()
                                             if k in ("lower_percentile", "upper_percentile")},
        )
    except TrackingUnavailable as err:
        log.error("%s", err)
        return EXIT_USAGE
    except (InputError, SettingsMismatch) as err:  # the manifest cannot give this fold's cases, or they
        log.error("cannot train: %s", err)        # do not fit the settings
        return EXIT_USAGE
    log.info("fold %d done: best epoch %d, %s; model %s", args.fold, summary["best_epoch"],
             ", ".join(f"{k} {v:.3f}" for k, v in summary["best_metrics"].items()), summary["model_uri"])
    return EXIT_OK


def cmd_cv_start(args: argparse.Namespace) -> int:
    from medseg import __version__
    from medseg.atomic import write_text_atomic
    from medseg.preprocessing.manifest import manifest_fingerprint
    from medseg.tracking import TrackingUnavailable, flatten, git_commit
    from medseg.training.run import start_cv_run

    config = _config_from_args(args)
    target = _tracking_target(config, args.tracking_uri)
    tags = {"medseg.version": __version__, "git.commit": git_commit(),
            "dataset.fingerprint": manifest_fingerprint(args.manifest)}
    train = config.get("train") or {}
    tags.update({f"medseg.{k}": str(train[k]) for k in ("network", "upsample") if k in train})
    try:
        run_id = start_cv_run(target, args.name, flatten(config), tags, _describe_cv(config))
    except TrackingUnavailable as err:
        log.error("%s", err)
        return EXIT_USAGE
    write_text_atomic(args.out, json.dumps({"parent_run_id": run_id, "tracking_uri": target.tracking_uri}) + "\n")
    log.info("cross-validation parent run %s", run_id)
    return EXIT_OK


def _read_evaluation_summary(path: str) -> dict[str, dict[str, float]]:
    """An evaluation's summary.csv as {label: {column: value}}.

    Raises:
        UsageError: missing, unreadable, or not a summary.csv (one row per
            label, numeric ``<metric>_mean`` columns).
    """
    import pandas as pd

    from medseg.evaluation.metrics import METRIC_NAMES

    what = f"--evaluations {path}"
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise UsageError(f"{what}: file not found") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{what}: unreadable ({err})") from err
    columns = ["label", *(f"{m}_mean" for m in METRIC_NAMES)]
    missing = [c for c in columns if c not in frame.columns]
    if missing or frame.empty or frame["label"].duplicated().any():
        raise UsageError(f"{what}: not an evaluation summary.csv (one row per label with columns "
                         f"{', '.join(columns)}; {'lacks ' + ', '.join(missing) if missing else 'rows repeat a label'})")
    values = frame[columns[1:]].apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        raise UsageError(f"{what}: non-numeric metric values")
    return {str(label): dict(zip(columns[1:], map(float, row))) for label, row in zip(frame["label"], values.values)}


def _describe_cv(config: dict) -> str:
    """The cross-validation run's description in the MLflow UI (Markdown)."""
    splits = config.get("splits") or {}
    labels = ", ".join(config.get("labels") or {})
    return (
        f"Cross-validation on **{config.get('dataset', 'dataset')}**: {splits.get('scheme', '?')} splits into "
        f"{splits.get('k', '?')} folds, labels {labels}.\n\n"
        "Nested runs: `fold<k>` (training, with its logged model) and `evaluation-fold<k>` (the fold's held-out "
        "test cases). Metrics here are means over the folds under the folds' own names: `best/*` at each fold's "
        "best epoch on its validation cases, `test/*` on the held-out test cases. The run ends when every fold "
        "is evaluated; tag `best_fold` names the fold whose model got the registry alias."
    )


def cmd_cv_finish(args: argparse.Namespace) -> int:
    from medseg.atomic import write_text_atomic
    from medseg.tracking import TrackingUnavailable
    from medseg.training.run import evaluation_means, finish_cv_run

    config = _config_from_args(args)
    target = _tracking_target(config, args.tracking_uri)
    parent = json.loads(Path(args.parent_run_file).read_text())["parent_run_id"]
    summaries = [json.loads(Path(p).read_text()) for p in args.fold_summaries]
    evaluations = [_read_evaluation_summary(path) for path in args.evaluations]
    try:
        summary = finish_cv_run(target, parent, summaries, evaluation_means(evaluations) if evaluations else None,
                                choice=args.choice)
    except TrackingUnavailable as err:
        log.error("%s", err)
        return EXIT_USAGE
    write_text_atomic(args.out, json.dumps(summary, indent=1) + "\n")
    log.info("best fold %s -> %s", summary["best_fold"], summary["model_uri"] or "no registered model")
    if summary["choice"] == "ensemble":
        log.info("new scans are predicted by the ensemble of folds %s (`medseg predict --model %s`)",
                 ", ".join(map(str, summary["folds"])), args.out)
    if summary.get("runs_view"):
        log.info("the folds side by side: `mlflow ui --backend-store-uri %s`, then open http://127.0.0.1:5000/%s",
                 target.tracking_uri, summary["runs_view"])
    return EXIT_OK


def cmd_tracking_server(args: argparse.Namespace) -> int:
    """A shared MLflow tracking server (PostgreSQL + served artifacts), in the foreground."""
    from medseg.tracking_server import TrackingServerError, serve

    extra = ["--allowed-hosts", args.allowed_hosts] if args.allowed_hosts else []
    try:
        return serve(args.data_dir, host=args.host, port=args.port, postgres_port=args.postgres_port,
                     backend_store_uri=args.backend_store_uri, artifacts_destination=args.artifacts_destination,
                     workers=args.workers, extra_args=extra)
    except TrackingServerError as err:
        log.error("%s", err)
        return EXIT_USAGE


def cmd_models(args: argparse.Namespace) -> int:
    """The models shipped with this installation: cards with their
    cross-validation figures and the terms of their training data."""
    from medseg.models import default_model, describe_shipped_model, shipped_models

    models = shipped_models()
    if not models:
        print("This installation ships no model; train one (README) and give it to `medseg predict --model`.")
        return EXIT_OK
    for model in models:
        print(describe_shipped_model(model, default=model.name == default_model()))
    return EXIT_OK


def _model_reference_problem(references: Sequence[str]) -> str | None:
    """Why a model reference cannot be loaded, found without loading it
    (a folder, a file that does not exist); None when each may be."""
    from medseg.models import shipped_models

    names = {m.name for m in shipped_models()}
    for reference in references:
        if Path(reference).is_dir() and not (Path(reference) / "MLmodel").is_file():
            return (f"model {reference} is a folder; give its best.pt, model.json or summary.json (or an MLflow "
                    "model folder, which holds an MLmodel file)")
        if not reference.startswith(("models:/", "runs:/")) and not Path(reference).exists() and reference not in names:
            return (f"model {reference}: file not found (give a best.pt, a model.json, models/summary.json, an "
                    f"MLflow models:/ or runs:/ URI, a .onnx file from `medseg export`, or a shipped model: "
                    f"{', '.join(sorted(names)) or 'none'})")
    return None


def _onnx_cache() -> Path:
    from medseg.inference.onnx_model import cache_folder

    return cache_folder()


def cmd_predict(args: argparse.Namespace) -> int:
    # Bad usage is refused before torch is imported or any input is read.
    from medseg.models import default_model

    out = Path(args.out)
    if not args.model:
        if default_model() is None:
            log.error("no --model given and this installation ships no model: give a best.pt, a model.json, "
                      "models/summary.json or an MLflow models:/ or runs:/ URI")
            return EXIT_USAGE
        args.model = [default_model()]
        log.info("--model not given: using %s, shipped with medseg (`medseg models` shows its figures and the "
                 "terms of its training data)", args.model[0])
    if len(set(args.model)) < len(args.model):
        log.warning("--model names the same model more than once: it is averaged with itself (no gain, more time)")
    problem = _model_reference_problem(args.model)
    if problem:
        log.error("%s", problem)
        return EXIT_USAGE
    from medseg.inference.backend import is_onnx_reference, resolve_backend

    try:
        resolve_backend(args.backend, args.model)  # refuses --backend pytorch with a .onnx model
    except ValueError as err:
        log.error("%s", err)
        return EXIT_USAGE
    if out.exists() and not out.is_dir():
        log.error("--out %s is a file; give a folder for the results", out)
        return EXIT_USAGE
    if any(Path(item).is_dir() and Path(item).resolve() == out.resolve() for item in args.inputs):
        log.error("--out %s is an input folder; give a folder of its own for the results (it may lie inside)", out)
        return EXIT_USAGE
    connection = _dicomweb_connection(args)
    target = _push_target(args)
    # Case IDs are given over the whole batch, before a chunk is taken, so
    # every chunk job names its scans as an unsplit run would.
    inputs = _collect(args.inputs, args.case_id_from, exclude=[args.out],  # --out may lie in an input folder
                      connection=connection, whole_archive=args.whole_archive)
    files = inputs.files
    push = _pusher(args, connection, files, target)
    if not files:
        log.error("no input files found in %s%s", _shown_inputs(args.inputs),
                  f" ({len(inputs.skipped)} files that are not images skipped)" if inputs.skipped else "")
        return EXIT_USAGE
    _check_servers(connection, files, target)
    if args.chunk is not None and _searches(args.inputs):
        log.warning("--chunk on a DICOMweb search: each chunk job searches again, and scans stored or deleted "
                    "meanwhile shift the chunks (scans missed or read twice); fix the list first with `medseg "
                    "list-inputs SOURCE --out list.txt` and give the chunks list.txt")

    from medseg.inference.model import load_for_backend
    from medseg.inference.predict import PredictSettings, predict_files
    from medseg.training.trainer import pick_device

    if args.chunk is not None:
        log.info("chunk %d of %d (0-based) of %d files", args.chunk.index, args.chunk.count, len(files))
        files = args.chunk.select(files)
    device = pick_device(args.device, "auto").torch_device
    backend = resolve_backend(args.backend, args.model, device.type)
    if backend == "onnxruntime" and not all(is_onnx_reference(m) for m in args.model):
        log.info("running %s in onnxruntime: exported to ONNX on first use, kept in %s (--backend pytorch: no "
                 "export)", " + ".join(args.model), _onnx_cache())
    try:
        model = load_for_backend(args.model[0] if len(args.model) == 1 else args.model, backend,
                                 args.tracking_uri, device, fallback=args.backend == "auto")
    except Exception as err:  # noqa: BLE001 - MLflow/torch/onnx raise many types for a bad model reference
        log.error("cannot load model %s: %s", " + ".join(args.model), err)
        return EXIT_USAGE
    settings = PredictSettings(threshold=args.threshold, postprocess=not args.no_postprocess, tta=args.tta,
                               batch_size=args.batch_size, write_seg=not args.no_seg,
                               read_options=_read_options(args), workers=args.workers)
    log.info("predicting %d file(s) with %s (labels %s, %d px) on %s in %s", len(files), model.uri,
             ", ".join(model.labels), model.size, device, model.backend)
    try:
        table, failures = predict_files(files, model, settings, args.out, device, chunk=args.chunk,
                                        skipped=inputs.skipped, fetch=_fetcher(connection), push=push)
    except KeyboardInterrupt:
        log.error("interrupted: the scans finished so far are kept in %s; run the same command again to predict "
                  "the rest", args.out)
        return EXIT_INTERRUPTED
    if args.chunk is None:
        log.info("results: %s (%d scans); failures: %d", Path(args.out) / "results.csv", len(table), len(failures))
    else:
        log.info("chunk results: %d scans, %d failures; `medseg gather-predictions %s --chunks %d` writes "
                 "results.csv once all chunks are done", len(table), len(failures), args.out, args.chunk.count)
    return EXIT_FAILURES if failures else EXIT_OK


def _fetcher(connection):
    """Retrieves a DICOMweb input through ``connection`` (None: no connection)."""
    if connection is None:
        return None
    from medseg.ingest.remote import retrieve

    return lambda entry: retrieve(connection, entry)


def _push_target(args: argparse.Namespace) -> str | None:
    """The DICOMweb root of --push-url (None: --push to each scan's own
    server, or no push), checked before anything is searched or read.

    Raises:
        UsageError: --push or --push-url with --no-seg (nothing to store), or
            a --push-url that is not a DICOMweb root (not http(s), a query).
    """
    if not (args.push or args.push_url):
        return None
    from medseg.dicomweb import DicomWebSource, redact_url

    if args.no_seg:
        raise UsageError("--push stores the DICOM SEG and structured report: leave out --no-seg")
    if not args.push_url:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(args.push_url)
    if parts.username or parts.password:
        raise UsageError(f"--push-url {redact_url(args.push_url)}: credentials in the URL; give them in "
                         "MEDSEG_DICOMWEB_USER and MEDSEG_DICOMWEB_PASSWORD, MEDSEG_DICOMWEB_TOKEN or an auth file "
                         "(README: Scans from a PACS), never in a URL")
    if parts.query or parts.fragment:
        raise UsageError(f"--push-url {redact_url(args.push_url)}: give the server's DICOMweb root, without a query "
                         "(e.g. https://pacs.example.org/dicom-web)")
    try:
        return DicomWebSource.parse(args.push_url.rstrip("/") + "/studies").base_url
    except ValueError:
        raise UsageError(f"--push-url {redact_url(args.push_url)}: not a DICOMweb root (http:// or https://, e.g. "
                         "https://pacs.example.org/dicom-web)") from None


def _pusher(args: argparse.Namespace, connection, files, target: str | None):
    """What stores a scan's SEG and SR for --push / --push-url, else None.

    Args:
        target: :func:`_push_target`'s server, None: each scan's own.

    Raises:
        UsageError: --push with inputs that came from no DICOMweb server
            (no --push-url).
    """
    if not (args.push or args.push_url):
        return None
    from medseg.dicomweb import DicomWebSource
    from medseg.inference.push import push_scan

    if target is None and any(not f.url for f in files):
        raise UsageError("--push stores results on the DICOMweb server each scan came from, and some inputs are "
                         "files: give the server with --push-url <DICOMweb root>")

    def push(case_dir: Path, entry) -> list[str]:
        base = target or DicomWebSource.parse(entry.url).base_url
        return push_scan(connection, base, case_dir)

    return push


def _check_servers(connection, files, target: str | None) -> None:
    """Ask every DICOMweb server of the run that has not answered yet (the
    servers of a list file's instance URLs, the --push-url one) once, so
    that a wrong credential or a server that is down is said before any scan
    is predicted, not once per scan afterwards.

    Raises:
        UsageError: a server refused, is unreachable or is not DICOMweb.
    """
    if connection is None:
        return
    from medseg.dicomweb import DicomWebError, DicomWebSource

    servers = {DicomWebSource.parse(f.url).base_url for f in files if f.url} | ({target} if target else set())
    for root in connection.unmatched_sections(servers):
        log.warning("DICOMweb auth file section [%s] names no server of this run (%s): those servers get the "
                    "file's other credentials; check the section's address", root, ", ".join(sorted(servers)))
    for base in sorted(servers - connection.answered):
        try:
            connection.check(base)
        except DicomWebError as err:
            raise UsageError(str(err)) from None


EXPORT_FORMATS = ("onnx",)


def cmd_export(args: argparse.Namespace) -> int:
    """One model (several: their ensemble) as an ONNX file carrying its contract."""
    import time

    out = Path(args.out)
    if out.suffix.lower() != f".{args.format}":
        log.error("--out %s: give a file name ending in .%s (medseg tells model files by their suffix)", out,
                  args.format)
        return EXIT_USAGE
    if out.is_dir():
        log.error("--out %s is a folder; give the .%s file to write", out, args.format)
        return EXIT_USAGE
    problem = _model_reference_problem(args.model)
    if problem:
        log.error("%s", problem)
        return EXIT_USAGE
    from medseg.inference.backend import is_onnx_reference

    onnx = [m for m in args.model if is_onnx_reference(m)]
    if onnx:
        log.error("model %s is an ONNX file already; give the PyTorch model it came from", onnx[0])
        return EXIT_USAGE

    from medseg.inference.model import load_model
    from medseg.inference.onnx_model import OnnxExportError, export_onnx
    from medseg.training.trainer import pick_device

    pick_device("cpu", "auto")  # exported on the CPU, with all usable cores
    try:
        model = load_model(args.model[0] if len(args.model) == 1 else args.model, args.tracking_uri)
    except Exception as err:  # noqa: BLE001 - MLflow/torch raise many types for a bad model reference
        log.error("cannot load model %s: %s", " + ".join(args.model), err)
        return EXIT_USAGE
    start = time.perf_counter()
    try:
        export_onnx(model, out, opset=args.opset)
    except (OnnxExportError, ValueError) as err:
        log.error("cannot export: %s", err)
        return EXIT_FAILURES
    log.info("exported %s to %s in %.1f s (labels %s, %d px, checked against PyTorch); predict with `medseg "
             "predict --model %s`", model.uri, out, time.perf_counter() - start, ", ".join(model.labels), model.size,
             out)
    return EXIT_OK


def cmd_gather_predictions(args: argparse.Namespace) -> int:
    from medseg.errors import InputError
    from medseg.inference.predict import gather_chunks

    try:
        table, failures = gather_chunks(args.out, args.chunks)
    except InputError as err:
        log.error("%s", err)
        return EXIT_USAGE
    log.info("results: %s (%d scans from %d chunks); failures: %d", Path(args.out) / "results.csv", len(table),
             args.chunks, len(failures))
    return EXIT_OK


def cmd_mlflow_runs(args: argparse.Namespace) -> int:
    from medseg.runs_page import write_runs_page

    for path in (args.cv_run, *args.models, *([args.cv_summary] if args.cv_summary else [])):
        if not Path(path).is_file():
            raise UsageError(f"{path}: file not found")
    if args.evaluations and len(args.evaluations) != len(args.models):
        raise UsageError(f"--evaluations: {len(args.evaluations)} folders for {len(args.models)} --models")
    # An evaluation's folder, or any file in it (e.g. its summary.csv).
    evaluations = [Path(d) if Path(d).is_dir() else Path(d).parent for d in args.evaluations]
    for folder in evaluations:
        if not folder.is_dir():
            raise UsageError(f"--evaluations {folder}: folder not found")
    try:
        write_runs_page(Path(args.out), Path(args.cv_run), [Path(m) for m in args.models],
                        Path(args.cv_summary) if args.cv_summary else None, evaluations)
    except (ValueError, AttributeError, TypeError) as err:  # malformed JSON records
        raise UsageError(f"a run record is not what cv-start, train, cv-finish or evaluate write: {err}") from err
    log.info("MLflow runs of %d fold%s: %s", len(args.models), "" if len(args.models) == 1 else "s", args.out)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluation.evaluate import (
        comparison_table, evaluate_predictions, log_evaluation_to_mlflow, summarise, write_evaluation,
    )

    # Bad usage is refused before any work: a missing --model-json would
    # otherwise surface only after the results were written.
    for option, path in (("--model-json", args.model_json), ("--config", args.config)):
        if path and not Path(path).is_file():
            raise UsageError(f"{option} {path}: file not found")
    labels = args.labels
    config = _config_from_args(args) if args.config or args.config_json else {}
    labels = labels or config.get("labels")
    if not labels:
        from medseg.structures import DEFAULT_LABELS

        labels = {k: list(v) for k, v in DEFAULT_LABELS.items()}
    from medseg.errors import InputError

    pred_dir = Path(args.predictions)
    if not Path(args.truth).is_dir():
        log.error("%s: ground-truth folder not found", args.truth)
        return EXIT_USAGE
    if args.truth_format == "scr":  # a structure without its folder would fail every case
        absent = sorted({s for group in labels.values() for s in group if not (Path(args.truth) / s).is_dir()})
        if absent:
            raise UsageError(f"labels use structures with no folder in {args.truth} (SCR layout "
                             f"<structure>/<ID>.gif): {', '.join(absent)}")
    if not pred_dir.is_dir():
        raise UsageError(f"--predictions {pred_dir}: folder not found")
    plan = None if args.no_mlflow else _plan_evaluation_run(args, config, labels)
    try:
        table, problems = evaluate_predictions(pred_dir, Path(args.truth), labels, truth_format=args.truth_format,
                                               label_values=args.label_values)
    except (InputError, ValueError) as err:  # no prediction folder, inconsistent options
        log.error("%s", err)
        return EXIT_USAGE
    if table.empty:
        log.error("no case could be evaluated: %s", "; ".join(f"{c}: {p}" for c, p in problems[:5]))
        return EXIT_FAILURES
    summary = summarise(table)

    def image_of(case_id: str):
        meta = json.loads((pred_dir / case_id / "prediction.json").read_text())
        from medseg.ingest import load_image
        from medseg.preprocessing.intensity import normalise_intensity

        image = load_image(meta["source"], _read_options(args))
        return normalise_intensity(image.pixels, valid=None if image.padding is None else ~image.padding)

    write_evaluation(args.out, table, summary, problems, pred_dir=pred_dir, truth_root=Path(args.truth),
                     images=image_of, labels=labels, truth_format=args.truth_format, label_values=args.label_values)
    print(comparison_table(summary, table["case_id"].astype(str).tolist(), args.truth_format))
    if plan is not None:
        _log_evaluation(args, plan, summary)
    for case_id, problem in problems:
        log.warning("not evaluated: %s: %s", case_id, problem)
    return EXIT_FAILURES if problems else EXIT_OK


def _prediction_settings(pred_dir: Path) -> list[dict]:
    """The distinct run settings (model URI, threshold, TTA, ...) recorded in
    the prediction folders' prediction.json files."""
    seen: list[dict] = []
    for meta_file in sorted(pred_dir.glob("*/prediction.json")):
        try:
            settings = json.loads(meta_file.read_text()).get("settings") or {}
        except (OSError, ValueError):
            continue  # reported as a problem by the evaluation itself
        if settings and settings not in seen:
            seen.append(settings)
    return seen


def _plan_evaluation_run(args: argparse.Namespace, config: dict, labels: dict):
    """Everything the evaluation's MLflow run needs, checked before any work
    (so bad usage is refused before results are written).

    Returns:
        (target, link, params, tags).

    Raises:
        UsageError: unreadable --model-json, missing --manifest, predictions
            made by another model than --model-json's, or an unreachable store.
    """
    from medseg import __version__
    from medseg.evaluation.evaluate import EvaluationLink
    from medseg.tracking import TrackingUnavailable, client_for, connect, flatten, git_commit

    model_json: dict = {}
    if args.model_json:
        try:
            model_json = json.loads(Path(args.model_json).read_text())
            if not isinstance(model_json, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise UsageError(f"--model-json {args.model_json}: not a model.json ({err})") from err
    if args.manifest and not Path(args.manifest).is_file():
        raise UsageError(f"--manifest {args.manifest}: file not found")
    settings = _prediction_settings(Path(args.predictions))
    predicted_by = sorted({str(s.get("model_uri")) for s in settings if s.get("model_uri")})
    expected = model_json.get("model_uri")
    if expected and any(u.startswith("models:/") and u != expected for u in predicted_by):
        raise UsageError(f"--model-json {args.model_json} is the model {expected}, but the predictions in "
                         f"{args.predictions} were made by {', '.join(predicted_by)}: give the model.json of the "
                         "model that made them")
    if not config.get("mlflow") and not config.get("dataset") and model_json.get("experiment"):
        # No workflow config: log where the model's training run is.
        config = {**config, "mlflow": {"experiment": model_json["experiment"]}, "dataset": model_json["experiment"]}
    target = _tracking_target(config, args.tracking_uri or model_json.get("tracking_uri"))
    try:
        connect(target.tracking_uri, target.experiment)
    except TrackingUnavailable as err:
        raise UsageError(str(err)) from err
    # Links to runs and models hold only within the store that has them.
    training: dict = {}
    if model_json.get("run_id"):
        if model_json.get("tracking_uri") != target.tracking_uri:
            log.warning("the model's training run is in %s, not in %s: the evaluation run is not linked to it",
                        model_json.get("tracking_uri"), target.tracking_uri)
        else:
            try:
                training = client_for(target.tracking_uri).get_run(model_json["run_id"]).data.tags
            except Exception as err:  # noqa: BLE001 - a deleted run: evaluate without its tags
                log.warning("training run %s not found in %s (%s): evaluation not linked to it",
                            model_json["run_id"], target.tracking_uri, type(err).__name__)
    if args.manifest and not training:
        log.warning("--manifest %s: logged as the evaluation's dataset only when the run is linked to the model's "
                    "training run (its dataset fingerprint)", args.manifest)
    link = EvaluationLink(
        training_run_id=model_json.get("run_id") if training else None,
        model_uri=(expected if training or not model_json else None) or (predicted_by[0] if len(predicted_by) == 1
                                                                         else None),
        model_id=model_json.get("model_id") if training else None,
        parent_run_id=model_json.get("parent_run_id") if training else None,
        fold=model_json.get("fold"),
        dataset_fingerprint=training.get("dataset.fingerprint"),
        manifest=args.manifest,
        dataset_name=target.experiment,
    )
    # What the scores depend on: the truth, the labels and how the masks were predicted.
    params = {"truth_format": args.truth_format, "predictions": str(args.predictions), **flatten({"labels": labels})}
    if len(settings) == 1:
        params.update({f"predict.{k}": str(v) for k, v in settings[0].items()
                       if k in ("threshold", "tta", "postprocess", "model_weights_sha256", "backend")})
    tags = {"medseg.version": __version__, "git.commit": git_commit()}
    # The architecture, so that evaluations of several networks in one
    # experiment filter and group by it as their training runs do.
    tags.update({k: training[k] for k in ("medseg.network", "medseg.upsample") if k in training})
    return target, link, params, tags


def _log_evaluation(args: argparse.Namespace, plan, summary) -> None:
    """The evaluation's MLflow run (see :func:`_plan_evaluation_run`), and its
    ID in ``<out>/mlflow_run.json``."""
    from medseg.atomic import write_text_atomic
    from medseg.evaluation.evaluate import EVALUATION_RUN_RECORD, log_evaluation_to_mlflow

    target, link, params, tags = plan
    run_id = log_evaluation_to_mlflow(target.tracking_uri, target.experiment, args.out, summary, link, params, tags)
    experiment_id = _experiment_id(target)
    write_text_atomic(Path(args.out) / EVALUATION_RUN_RECORD, json.dumps(
        {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": target.tracking_uri}) + "\n")
    log.info("evaluation logged to MLflow run %s", run_id)


def _experiment_id(target) -> str:
    from medseg.tracking import client_for

    return client_for(target.tracking_uri).get_experiment_by_name(target.experiment).experiment_id


def cmd_list_cases(args: argparse.Namespace) -> int:
    """Source files of one part of a split, one per line (for `medseg predict`)."""
    from medseg.atomic import write_text_atomic
    from medseg.preprocessing.manifest import read_manifest
    from medseg.preprocessing.splits import read_splits

    folds = read_splits(args.splits)["folds"]
    if not 0 <= args.fold < len(folds):
        log.error("%s: no fold %d", args.splits, args.fold)
        return EXIT_USAGE
    from medseg.ingest.inputs import list_file_line

    manifest = read_manifest(args.manifest).set_index("case_id")
    cases = folds[args.fold][args.part]
    # The manifest's case IDs travel with the files, so predictions are
    # named as the cases were in training and evaluation.
    write_text_atomic(args.out, "".join(list_file_line(manifest.at[c, "source"], c, manifest.at[c, "input_name"])
                                        for c in cases))
    log.info("%d %s cases of fold %d -> %s", len(cases), args.part, args.fold, args.out)
    return EXIT_OK


def cmd_list_inputs(args: argparse.Namespace) -> int:
    """The files `medseg predict` would read from INPUTS, one absolute path per
    line: a fixed list, so chunk jobs agree on which scans each one takes."""
    from medseg.atomic import write_text_atomic
    from medseg.ingest.inputs import list_file_line

    inputs = _collect(args.inputs, args.case_id_from, connection=_dicomweb_connection(args),
                      whole_archive=args.whole_archive)
    if not inputs.files:
        log.error("no input files found in %s", _shown_inputs(args.inputs))
        return EXIT_USAGE
    lines, unlisted = [], []
    for f in inputs.files:
        try:
            lines.append(list_file_line(f.url or f.path.resolve(), f.case_id, f.name))
        except ValueError:  # a tab or line break in the path: no list line can hold it
            unlisted.append(f.path)
            log.error("%s: cannot be listed: its path holds a tab or line break (rename it, or predict its "
                      "folder directly)", f.path)
    write_text_atomic(args.out, "".join(lines))
    log.info("%d input files -> %s (%d non-image files skipped)", len(lines), args.out, len(inputs.skipped))
    if _searches(args.inputs):  # a cap is invisible to QIDO-RS: only the user can compare
        log.info("a DICOMweb server may cap a search's results without saying so (Orthanc: LimitFindResults): "
                 "compare %d with the archive's own count before a first --push (README: Scans from a PACS)",
                 len(lines))
    if unlisted:
        log.error("list-inputs: %d of %d inputs could not be listed", len(unlisted), len(inputs.files))
        return EXIT_FAILURES
    return EXIT_OK


WHOLE_ARCHIVE_HELP = ("allow a DICOMweb search without a filter (<root>/studies, <root>/series): it reads every "
                      "image on the server (refused without this option)")


def build_parser() -> argparse.ArgumentParser:
    from medseg.inference.backend import BACKENDS, CPU_DEFAULT_BACKEND
    from medseg.preprocessing.splits import SPLIT_SCHEMES
    from medseg.structures import SCR_STRUCTURES

    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantoms", help="write synthetic chest radiographs (DICOM) with SCR-layout masks")
    p.add_argument("--out", required=True, help="output folder (gets images/ and masks/<structure>/)")
    p.add_argument("--n", type=_positive_int, default=24, help="number of phantoms (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=_positive_int, default=512)
    p.add_argument("--width", type=_positive_int, default=512)
    p.add_argument("--pixel-spacing", type=float, default=0.7, metavar="MM")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("ingest", help="read images and print what the pipeline sees (JSON lines)")
    p.add_argument("inputs", nargs="+", help="files, folders (searched recursively), globs or list files (.txt)")
    p.add_argument("--case-id-from", choices=["filename", "sop_instance_uid"], default="filename",
                   help="case IDs (output names) from the file name (default) or, for DICOM, the SOP Instance UID")
    _add_read_options(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("preprocess", help="images (+ masks) -> NIfTI at a square size + manifest.csv")
    p.add_argument("--images", required=True, help="image file or folder (recursive; DICOM may lack an extension)")
    p.add_argument("--masks", help="mask folder: SCR layout (<structure>/<ID>.gif) or label images (<ID>.png/.nii.gz)")
    p.add_argument("--mask-format", choices=["scr", "label_image"], default="scr")
    p.add_argument("--structures", type=_csv_list, default=list(SCR_STRUCTURES),
                   help=f"source structures, comma-separated (default {','.join(SCR_STRUCTURES)})")
    p.add_argument("--label-values", type=_label_values,
                   help="for label images: VALUE=STRUCTURE,... e.g. 1=heart,2=left_lung")
    p.add_argument("--case-id-from", choices=["filename", "sop_instance_uid"], default="filename",
                   help="case IDs (output names) from the file name (default) or, for DICOM, the SOP Instance UID")
    p.add_argument("--size", type=_positive_int, default=256, help="square output side in pixels (default 256)")
    p.add_argument("--lower-percentile", type=float, default=0.5)
    p.add_argument("--upper-percentile", type=float, default=99.5)
    p.add_argument("--workers", type=_positive_int, default=1, help="processes (default 1)")
    p.add_argument("--tolerate-failures", action="store_true",
                   help="exit 0 even if some inputs failed (they are still listed in failures.csv)")
    p.add_argument("--out", required=True, help="output folder (images/, labels/, label_fractions/, manifest.csv, failures.csv, skipped.csv)")
    _add_read_options(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("split", help="train/val/test splits from a manifest (k-fold or SCR's official folds)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--scheme", choices=SPLIT_SCHEMES, default="kfold")
    p.add_argument("--k", type=int, default=5, help="folds for kfold (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--out", required=True, help="splits JSON")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("preview", help="contact sheet PNG of preprocessed cases with label overlays")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--max-cases", type=_positive_int, default=12)
    p.add_argument("--labels", type=_label_groups,
                   help='label groups as JSON, e.g. \'{"lungs": ["left_lung", "right_lung"]}\'')
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("train", help="train a U-Net on one fold, tracked in MLflow (resumes from last.pt)")
    _add_config_arguments(p)
    p.add_argument("--manifest", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for checkpoints, metrics.csv, curves, overlays, model.json")
    p.add_argument("--parent-run-file", help="cv_run.json from `medseg cv-start` (nests this run under it)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else results/mlflow.db)")
    group = p.add_argument_group("overrides of the config's train section")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--network")
    group.add_argument("--preset")
    group.add_argument("--upsample")
    group.add_argument("--device")
    group.add_argument("--seed", type=int)
    group.add_argument("--learning-rate", type=float)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment new scans: masks, NIfTI, overlay, DICOM SEG, results table")
    p.add_argument("inputs", nargs="+", help="folders (recursive; DICOM may lack an extension), globs, list files "
                                             "(.txt, one path or DICOMweb instance URL per line, as list-inputs "
                                             "writes them), files, or DICOMweb sources: <root>/studies/<uid>"
                                             "[/series/<uid>[/instances/<uid>]], <root>/series?Modality=CR, "
                                             "<root>/studies?StudyDate=20240101-20240131, <root>/instances?... "
                                             "(README: Scans from a PACS)")
    p.add_argument("--model", action="append",
                   help="MLflow model URI (models:/<name>@<alias>, runs:/<id>/model), a best.pt checkpoint, "
                        "a fold's model.json, the cross-validation's models/summary.json (its choice: the "
                        "best fold or the folds' ensemble) or the name of a model shipped with medseg (`medseg "
                        "models`; the default); given several times, the models' probabilities are averaged "
                        "(an ensemble), or a .onnx file written by `medseg export`")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per scan + results.csv/.parquet)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs (default: $MLFLOW_TRACKING_URI, "
                                          "else results/mlflow.db)")
    p.add_argument("--threshold", type=_probability,
                   help="probability from which a pixel belongs to a label, between 0 and 1, for every label "
                        "(default: the model's own per-label thresholds chosen on cross-validation, else 0.5)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (small shifts, no flips)")
    p.add_argument("--no-postprocess", action="store_true", help="keep all connected components and holes")
    p.add_argument("--no-seg", action="store_true",
                   help="do not write the DICOM SEG and SR files (seg.dcm, sr.dcm)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="scans per forward pass (default 8)")
    p.add_argument("--workers", type=_non_negative_int,
                   help="threads reading scans ahead of the forward pass and, as many, writing results behind it "
                        "(default: 2 when there is more than one batch; 0: read, predict and write one after the "
                        "other)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--case-id-from", choices=["filename", "sop_instance_uid"], default="filename",
                   help="case IDs (output names) from the file name (default) or, for DICOM, the SOP Instance UID")
    p.add_argument("--chunk", type=_chunk, metavar="I/N",
                   help="predict only chunk I (0-based) of N near-equal parts of the inputs, as one of N parallel "
                        "jobs; then `medseg gather-predictions` writes the batch's tables")
    p.add_argument("--push", action="store_true",
                   help="store each scan's DICOM SEG and CTR structured report (TID 1500) on the DICOMweb server it "
                        "came from (STOW-RS), once: instances the server holds are not stored again")
    p.add_argument("--push-url", metavar="ROOT",
                   help="store them on this DICOMweb server instead (e.g. for scans read from files)")
    p.add_argument("--whole-archive", action="store_true", help=WHOLE_ARCHIVE_HELP)
    p.add_argument("--dicomweb-auth", metavar="FILE",
                   help="DICOMweb credentials file ('token = ...', or 'username = ...' and 'password = ...'); "
                        "default: $MEDSEG_DICOMWEB_AUTH_FILE, $MEDSEG_DICOMWEB_TOKEN, or $MEDSEG_DICOMWEB_USER and "
                        "$MEDSEG_DICOMWEB_PASSWORD")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="runtime: pytorch, or onnxruntime (a PyTorch model is exported to ONNX on first use and "
                        "kept in $MEDSEG_CACHE_DIR/onnx, default ~/.cache/medseg/onnx); auto (default): onnxruntime "
                        f"for a .onnx model, else PyTorch on CUDA and {CPU_DEFAULT_BACKEND} on CPU (the faster there; PyTorch "
                        "when a model cannot be exported)")
    _add_read_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a model (several: their ensemble) as an ONNX file carrying its "
                                      "contract (labels, size, normalisation), checked against PyTorch")
    p.add_argument("model", nargs="+",
                   help="any model predict --model takes but a .onnx: a best.pt, a model.json, models/summary.json, "
                        "an MLflow models:/ or runs:/ URI or a shipped model's name; several: their ensemble "
                        "(probabilities averaged) as one graph")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx", help="file format (default onnx)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx (replaced if it exists)")
    p.add_argument("--opset", type=_positive_int, help="ONNX opset (default: torch's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs (default: $MLFLOW_TRACKING_URI, "
                                          "else results/mlflow.db)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="models shipped with medseg: cross-validation figures, training data and "
                                      "its terms of use")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("gather-predictions", help="results.csv/.parquet, CTR histogram, overlays contact sheet, "
                                                  "summary.txt and failures.csv of a batch predicted in chunks "
                                                  "(predict --chunk)")
    p.add_argument("out", help="the batch's output folder (predict --out)")
    p.add_argument("--chunks", type=_positive_int, required=True, help="N of the chunks' I/N")
    p.set_defaults(func=cmd_gather_predictions)

    p = sub.add_parser("mlflow-runs", help="the workflow's MLflow run IDs and how to open the MLflow UI, as "
                                           "reStructuredText (the report's main page includes it)")
    p.add_argument("--cv-run", required=True, help="models/cv_run.json (cv-start)")
    p.add_argument("--cv-summary", help="models/summary.json (cv-finish)")
    p.add_argument("--models", nargs="+", required=True, help="each fold's model.json")
    p.add_argument("--evaluations", nargs="+", default=[], metavar="FOLDER",
                   help="each fold's evaluation folder (same order as --models), for its mlflow_run.json")
    p.add_argument("--out", required=True, help="the .rst file to write")
    p.set_defaults(func=cmd_mlflow_runs)

    p = sub.add_parser("evaluate", help="score predictions against ground truth (Dice, Jaccard, HD95, ASSD in mm)")
    p.add_argument("--predictions", required=True, help="output folder of `medseg predict`")
    p.add_argument("--truth", required=True, help="ground truth: SCR layout (<structure>/<ID>.gif) or label images")
    p.add_argument("--truth-format", choices=["scr", "label_image"], default="scr")
    p.add_argument("--label-values", type=_label_values, help="for label images: VALUE=STRUCTURE,...")
    p.add_argument("--labels", type=_label_groups,
                   help='label groups as JSON (default: the config\'s, else heart/lungs/clavicles)')
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", help="workflow config (labels, MLflow experiment)")
    group.add_argument("--config-json", help="the same, as JSON text")
    p.add_argument("--model-json", help="the fold's model.json: links the evaluation run to its training run")
    p.add_argument("--tracking-uri")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow evaluation run")
    p.add_argument("--manifest", help="the preprocessing manifest, logged as the evaluation run's dataset input")
    p.add_argument("--out", required=True, help="folder for cases.csv, summary.csv/.txt, box plots, worst cases")
    _add_read_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("list-cases", help="source files of one part of a split (input list for predict)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--part", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_list_cases)

    p = sub.add_parser("list-inputs", help="the files predict would read from folders/globs/lists, as a list file")
    p.add_argument("inputs", nargs="+", help="folders (recursive), globs, list files (.txt), files or DICOMweb "
                                             "sources (as predict takes them)")
    p.add_argument("--case-id-from", choices=["filename", "sop_instance_uid"], default="filename",
                   help="case IDs (output names) from the file name (default) or, for DICOM, the SOP Instance UID")
    p.add_argument("--out", required=True, help="list file to write (one line per input: absolute path or "
                                                "DICOMweb instance URL, case ID and name, tab-separated)")
    p.add_argument("--dicomweb-auth", metavar="FILE", help="DICOMweb credentials file (as predict takes it)")
    p.add_argument("--whole-archive", action="store_true", help=WHOLE_ARCHIVE_HELP)
    p.set_defaults(func=cmd_list_inputs)

    p = sub.add_parser("cv-start", help="create the MLflow parent run of a cross-validation")
    _add_config_arguments(p)
    p.add_argument("--manifest", required=True)
    p.add_argument("--name", default="cross-validation")
    p.add_argument("--tracking-uri")
    p.add_argument("--out", required=True, help="cv_run.json")
    p.set_defaults(func=cmd_cv_start)

    p = sub.add_parser("cv-finish", help="summarise folds into the parent run; alias the best fold's model")
    _add_config_arguments(p)
    p.add_argument("--parent-run-file", required=True)
    p.add_argument("--tracking-uri")
    p.add_argument("--out", required=True, help="summary.json")
    p.add_argument("fold_summaries", nargs="+", help="model.json of each fold")
    p.add_argument("--choice", choices=["best_fold", "ensemble"], default="best_fold",
                   help="what predicts new scans through summary.json: the best fold's model, or every fold's "
                        "model with their probabilities averaged (default best_fold)")
    p.add_argument("--evaluations", nargs="+", default=[], metavar="SUMMARY_CSV",
                   help="the folds' evaluation summary.csv files: their means go into the cross-validation run "
                        "as test/<metric>/<label>")
    p.set_defaults(func=cmd_cv_finish)

    p = sub.add_parser("tracking-server", help="run a shared MLflow tracking server (PostgreSQL backend, served "
                                               "artifacts) in the foreground; Ctrl-C stops it")
    p.add_argument("--data-dir", required=True,
                   help="holds postgres/ (the database, created on first start), artifacts/ and logs/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a team)")
    p.add_argument("--port", type=_positive_int, default=5000, help="MLflow port (default 5000)")
    p.add_argument("--postgres-port", type=_positive_int,
                   help="port of the local PostgreSQL, loopback only (default 5432, or a free one if taken)")
    p.add_argument("--backend-store-uri", metavar="URI",
                   help="use this existing database (postgresql://user:password@host:5432/db) instead of starting "
                        "PostgreSQL in DATA_DIR")
    p.add_argument("--artifacts-destination", metavar="URI",
                   help="artifact store: a folder or e.g. s3://bucket/path (default DATA_DIR/artifacts)")
    p.add_argument("--workers", type=_positive_int, default=2, help="mlflow server worker processes (default 2)")
    p.add_argument("--allowed-hosts",
                   help="Host headers the server accepts, e.g. mlflow.example.org,mlflow.example.org:5000 "
                        "(MLflow's default: localhost and private IP addresses)")
    p.set_defaults(func=cmd_tracking_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # highdicom narrates every module it copies into a SEG at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (FileNotFoundError, UsageError, DeviceUnavailable) as err:
        log.error("%s", err)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
