# medseg workflow: phantoms or a folder of radiographs -> preprocessed NIfTI +
# manifest -> splits -> preview -> training (one job per fold, tracked in
# MLflow) -> prediction on each fold's held-out scans -> evaluation; then
# `snakemake --report` gathers the pictures and tables.
#
#   snakemake --profile workflow/profiles/default              # phantoms demo
#   snakemake --profile workflow/profiles/default \
#       --configfile config/jsrt-cpu.yaml --config data_root=/path/to/jsrt-scr   # (GPU: config/jsrt.yaml)

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/phantoms.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


# Seconds of work each: on a cluster they run on the submitting host, not as jobs.
localrules:
    resolved_config,
    cv_start,
    cv_finish,
    test_cases,
    inference_inputs,
    gather_predictions,
    mlflow_runs,


rule all:
    input:
        dataset_path("config.json"),  # the resolved config, a report item
        dataset_path("splits.json"),
        dataset_path("preprocessed/preview.png"),
        dataset_path("models/summary.json"),
        expand(dataset_path("evaluation/fold{fold}/summary.csv"), fold=config["train_folds"]),
        dataset_path("report/mlflow_runs.rst"),  # the report's main page includes it
        # New scans (config inference), when there are any.
        [dataset_path(f"predictions/{config['inference']['name']}/results.csv")] if config["inference"]["inputs"] else [],
    default_target: True
