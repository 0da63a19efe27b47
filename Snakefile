# medseg workflow: phantoms or a folder of radiographs -> preprocessed NIfTI +
# manifest -> splits -> preview -> training (one job per fold, tracked in
# MLflow). Later stages (predict, evaluate, report) hang off the same
# results/<dataset>/ tree.
#
#   snakemake --profile workflow/profiles/default              # phantoms demo
#   snakemake --profile workflow/profiles/default \
#       --configfile config/jsrt.yaml --config data_root=/path/to/jsrt-scr

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/phantoms.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        dataset_path("splits.json"),
        dataset_path("preprocessed/preview.png"),
        dataset_path("models/summary.json"),
    default_target: True
