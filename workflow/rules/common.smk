import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate


def _typed_nested_values(value, depth=0):
    """Snakemake parses nested --config values with YAML's BaseLoader, so
    `--config preprocess='{size: 512}'` arrives as the string '512'. Re-read
    nested scalar strings that are plainly numbers or booleans; anything else
    is left for the schema to judge."""
    import yaml

    if isinstance(value, dict):
        return {k: _typed_nested_values(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed_nested_values(v, depth + 1) for v in value]
    if depth > 0 and isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip() else value
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


for _key in list(config):
    config[_key] = _typed_nested_values(config[_key])

validate(config, "../schemas/config.schema.yaml")


def _check_config_consistency(cfg):
    """Cross-key checks the JSON schema cannot express."""
    structures = set(cfg["structures"])
    for label, members in cfg["labels"].items():
        unknown = sorted(set(members) - structures)
        if unknown:
            raise ValueError(
                f"config key labels.{label}: {', '.join(unknown)} not in 'structures' ({', '.join(cfg['structures'])})"
            )
    if cfg["mask_format"] == "label_image":
        missing = sorted(structures - set(cfg.get("label_values", {}).values()))
        if missing:
            raise ValueError(f"config key label_values: no pixel value for structures {', '.join(missing)}")
    # Before any job runs (the train job would refuse them only after
    # preprocessing). medseg.training.choices imports no torch.
    from medseg.training.choices import check_network_choice, size_problem

    train = cfg["train"]
    try:
        check_network_choice(train["network"], train["upsample"])
    except ValueError as err:
        raise ValueError(f"config key train: {err}") from None
    problem = size_problem(train["network"], cfg["preprocess"]["size"])
    if not problem and train.get("patch_size"):
        problem = size_problem(train["network"], train["patch_size"], "train.patch_size")
    if problem:
        raise ValueError(f"config key train.network: {problem}")


_check_config_consistency(config)

# Rules call the medseg CLI with this environment's interpreter, so a cluster
# job uses the same installation as the submitting process.
MEDSEG = f"{shlex.quote(sys.executable)} -m medseg"
DATASET = config["dataset"]


def all_cores(cluster_default=8):
    """Threads for a rule that uses every core it gets: all of --cores on a
    local run; on a cluster (no --cores), the profile's set-threads decides,
    else ``cluster_default``."""
    return workflow.resource_settings.cores or cluster_default


def dataset_path(relative):
    """Path under results/<dataset>/ for the configured dataset."""
    return f"results/{DATASET}/{relative}"


def images_input(wildcards):
    if config["source"] == "phantoms":
        return f"results/{wildcards.dataset}/raw"
    return str(Path(config["data_root"]) / config["images_subdir"])


def masks_input(wildcards):
    if config["source"] == "phantoms":
        return f"results/{wildcards.dataset}/raw"
    if not config.get("masks_subdir"):
        return []
    return str(Path(config["data_root"]) / config["masks_subdir"])


def images_argument(wildcards, input):
    if config["source"] == "phantoms":
        return shlex.quote(str(Path(input.images) / "images"))
    return shlex.quote(input.images)


def masks_argument(wildcards, input):
    if config["source"] == "phantoms":
        return f"--masks {shlex.quote(str(Path(input.masks) / 'masks'))}"
    if not config.get("masks_subdir"):
        return ""
    return f"--masks {shlex.quote(input.masks)} --mask-format {config['mask_format']}"


def case_id_argument():
    return f"--case-id-from {config['read']['case_id_from']}"


def read_arguments():
    """How to read images without their own metadata (medseg's read options)."""
    read = config["read"]
    args = [f"--pixel-spacing {read['pixel_spacing_mm']}"]
    if read["invert"]:
        args.append("--invert")
    if not read["apply_voi"]:
        args.append("--no-voi")
    return " ".join(args)


def label_values_argument():
    values = config.get("label_values") or {}
    if config["mask_format"] != "label_image" or not values:
        return ""
    return "--label-values " + ",".join(f"{k}={v}" for k, v in values.items())


wildcard_constraints:
    dataset=r"[A-Za-z0-9._-]+",
    fold=r"\d+",
    chunk=r"\d+",
    batch=r"[A-Za-z0-9._-]+",


# Sections that decide a training run. Training rules get them as text params,
# so a change elsewhere (e.g. predict.threshold) does not retrain.
TRAINING_SECTIONS = ("dataset", "source", "structures", "labels", "read", "phantoms", "preprocess", "splits",
                     "train", "mlflow")


def training_config_json():
    return json.dumps({k: config[k] for k in TRAINING_SECTIONS if k in config})


# Sections that decide an evaluation (labels, where it is logged, what was
# predicted); e.g. a new inference batch does not rerun it, nor cv_finish,
# which summarises the evaluations.
EVALUATION_SECTIONS = ("dataset", "structures", "labels", "mlflow", "predict")


def evaluation_config_json():
    sections = {k: config[k] for k in EVALUATION_SECTIONS if k in config}
    # predict.ensemble decides new-scan batches only, not the folds' evaluations.
    sections["predict"] = {k: v for k, v in sections.get("predict", {}).items() if k != "ensemble"}
    return json.dumps(sections)


def report_labels(item, scope):
    """Labels of a report item: what it is, and what it covers ("fold {fold}",
    "batch {batch}", "dataset {dataset}"; wildcards are filled per job).

    Every item has these two keys: the report lists a category's items as a
    table with a column per label key, so items with other keys would leave
    cells empty, and one item without labels turns the list into file paths.
    """
    return {"item": item, "scope": scope}
