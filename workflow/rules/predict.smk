def truth_argument(wildcards, input):
    """Ground-truth masks of the dataset (SCR layout or label images)."""
    if config["source"] == "phantoms":
        return shlex.quote(str(Path(input.truth) / "masks"))
    args = f"{shlex.quote(input.truth)} --truth-format {config['mask_format']}"
    values = config.get("label_values") or {}
    if config["mask_format"] == "label_image" and values:
        args += " --label-values " + ",".join(f"{k}={v}" for k, v in values.items())
    return args


def push_arguments(wildcards):
    """--push / --push-url for a batch of new scans (config inference.push); none for a fold's test scans."""
    if fold_of_batch(wildcards.batch) is not None or not INFERENCE.get("push"):
        return ""
    if INFERENCE["push"] == "url":
        if not INFERENCE.get("push_url"):
            raise ValueError("config inference.push is url but inference.push_url is not set: give the DICOMweb "
                             "root to store the results on")
        return f"--push-url {shlex.quote(str(INFERENCE['push_url']))}"
    return "--push"


def predict_arguments():
    settings = config["predict"]
    args = [f"--batch-size {settings['batch_size']}"]
    if settings.get("threshold") is not None:  # null: the model's own thresholds
        args.append(f"--threshold {settings['threshold']}")
    if settings["tta"]:
        args.append("--tta")
    if not settings["postprocess"]:
        args.append("--no-postprocess")
    if not settings["write_seg"]:
        args.append("--no-seg")
    return " ".join(args)


rule test_cases:
    """The held-out test scans of one fold, as a list file for predict (with
    the manifest's case IDs, so predictions are named as in training)."""
    input:
        manifest="results/{dataset}/preprocessed/manifest.csv",
        splits="results/{dataset}/splits.json",
    output:
        "results/{dataset}/lists/test_fold{fold}.txt",
    log:
        "results/{dataset}/logs/test_cases_fold{fold}.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{MEDSEG} list-cases --manifest {input.manifest} --splits {input.splits} --fold {wildcards.fold}"
        " --part test --out {output} > {log} 2>&1"


PREDICT_CHUNKS = config["predict"]["chunks"]
INFERENCE = config["inference"]
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def fold_of_batch(batch):
    """A batch named fold<k> is fold k's held-out scans; any other name is a
    batch of new scans (config inference)."""
    match = re.fullmatch(r"fold(\d+)", batch)
    return int(match[1]) if match else None


def batch_scans(wildcards):
    if fold_of_batch(wildcards.batch) is not None:
        return f"results/{wildcards.dataset}/lists/test_{wildcards.batch}.txt"
    return f"results/{wildcards.dataset}/lists/inference_{wildcards.batch}.txt"


def batch_model(wildcards):
    """Model of a batch: the fold's own; for new scans inference.model, else
    the cross-validation's choice (models/summary.json)."""
    fold = fold_of_batch(wildcards.batch)
    if fold is not None:
        return f"results/{wildcards.dataset}/models/fold{fold}/model.json"
    return INFERENCE["model"] or f"results/{wildcards.dataset}/models/summary.json"


def batch_model_file(wildcards):
    """The model as a workflow input, unless it is an MLflow URI or the name
    of a model shipped with medseg (``medseg models``)."""
    from medseg.models import shipped_models

    model = batch_model(wildcards)
    if model.startswith(MODEL_URI_SCHEMES) or model in {m.name for m in shipped_models()}:
        return []
    return [model]


rule inference_inputs:
    """The new scans of config inference.inputs, as a fixed list for the chunk jobs."""
    output:
        "results/{dataset}/lists/inference_{batch}.txt",
    params:
        inputs=" ".join(shlex.quote(str(p)) for p in INFERENCE["inputs"]),
        case_ids=case_id_argument(),
        whole_archive="--whole-archive" if INFERENCE.get("whole_archive") else "",
    log:
        "results/{dataset}/logs/inference_inputs_{batch}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        # Case IDs are fixed here, over the whole batch, so that every chunk
        # job names its scans the same way.
        "{MEDSEG} list-inputs {params.inputs} {params.case_ids} {params.whole_archive} --out {output} > {log} 2>&1"


rule predict_chunk:
    """One chunk of a batch (a fold's held-out scans, or new scans); chunks run
    as parallel jobs, and a rerun skips the scans already finished."""
    input:
        model=batch_model_file,
        scans=batch_scans,
    output:
        table=f"results/{{dataset}}/predictions/{{batch}}/results.chunk-{{chunk}}-of-{PREDICT_CHUNKS}.csv",
        failures=f"results/{{dataset}}/predictions/{{batch}}/failures.chunk-{{chunk}}-of-{PREDICT_CHUNKS}.csv",
    params:
        model=lambda wildcards: shlex.quote(batch_model(wildcards)),
        out=subpath(output.table, parent=True),
        read=f"{read_arguments()} {case_id_argument()}",
        settings=predict_arguments(),
        push=push_arguments,
        chunks=PREDICT_CHUNKS,
    log:
        "results/{dataset}/logs/predict_{batch}_chunk{chunk}.log",
    benchmark:
        "results/{dataset}/benchmarks/predict_{batch}_chunk{chunk}.tsv"
    threads: all_cores()
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        # Exit status 1 (some scans failed) is not a job failure: the failures
        # are listed in the table and the batch goes on.
        "{MEDSEG} predict {input.scans} --model {params.model} --out {params.out} --chunk {wildcards.chunk}/{params.chunks}"
        " {params.read} {params.settings} {params.push} > {log} 2>&1 || [ $? -eq 1 ]"


rule gather_predictions:
    """The batch's results table, CTR histogram, overlays contact sheet,
    summary and failures, from its chunks."""
    input:
        expand(
            "results/{{dataset}}/predictions/{{batch}}/{table}.chunk-{chunk}-of-{n}.csv",
            table=("results", "failures"),
            chunk=range(PREDICT_CHUNKS),
            n=PREDICT_CHUNKS,
        ),
    output:
        table=report(
            "results/{dataset}/predictions/{batch}/results.csv",
            caption="../report/prediction_results.rst",
            category="Prediction",
            subcategory="batch {batch}",
            labels=report_labels("results table", "batch {batch}"),
        ),
        ctr=report(
            "results/{dataset}/predictions/{batch}/ctr_distribution.png",
            caption="../report/ctr_distribution.rst",
            category="Prediction",
            subcategory="batch {batch}",
            labels=report_labels("CTR distribution", "batch {batch}"),
        ),
        # A sample of the scans' own overlay.png files, which are not outputs
        # of any rule (their number depends on the data).
        overlays=report(
            "results/{dataset}/predictions/{batch}/overlays.png",
            caption="../report/prediction_overlays.rst",
            category="Prediction",
            subcategory="batch {batch}",
            labels=report_labels("overlays", "batch {batch}"),
        ),
        failures=report(
            "results/{dataset}/predictions/{batch}/failures.csv",
            caption="../report/prediction_failures.rst",
            category="Prediction",
            subcategory="batch {batch}",
            labels=report_labels("failures", "batch {batch}"),
        ),
        # Counts in three sentences; the captions above include it, which is
        # how they say "k of n scans" (a caption is a fixed file, templated
        # only with the job's paths, wildcards and config).
        summary="results/{dataset}/predictions/{batch}/summary.txt",
    params:
        out=subpath(output.table, parent=True),
        chunks=PREDICT_CHUNKS,
    log:
        "results/{dataset}/logs/gather_predictions_{batch}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{MEDSEG} gather-predictions {params.out} --chunks {params.chunks} > {log} 2>&1"


rule evaluate:
    """Dice, Jaccard, HD95, ASSD (mm) at the ground truth's resolution; MLflow evaluation run."""
    input:
        model="results/{dataset}/models/fold{fold}/model.json",
        manifest="results/{dataset}/preprocessed/manifest.csv",
        table="results/{dataset}/predictions/fold{fold}/results.csv",
        truth=masks_input,
    output:
        summary=report(
            "results/{dataset}/evaluation/fold{fold}/summary.csv",
            caption="../report/evaluation_summary.rst",
            category="Evaluation",
            subcategory="fold {fold}",
            labels=report_labels("summary table", "fold {fold}"),
        ),
        # The report shows a text file only as a download: its caption
        # includes it, so the summary is readable in the report itself.
        text=report(
            "results/{dataset}/evaluation/fold{fold}/summary.txt",
            caption="../report/evaluation_text.rst",
            category="Evaluation",
            subcategory="fold {fold}",
            labels=report_labels("summary", "fold {fold}"),
        ),
        cases=report(
            "results/{dataset}/evaluation/fold{fold}/cases.csv",
            caption="../report/evaluation_cases.rst",
            category="Evaluation",
            subcategory="fold {fold}",
            labels=report_labels("per-case metrics", "fold {fold}"),
        ),
        boxplots=report(
            "results/{dataset}/evaluation/fold{fold}/boxplots.png",
            caption="../report/evaluation_boxplots.rst",
            category="Evaluation",
            subcategory="fold {fold}",
            labels=report_labels("box plots", "fold {fold}"),
        ),
        worst=report(
            "results/{dataset}/evaluation/fold{fold}/worst_cases.png",
            caption="../report/evaluation_worst.rst",
            category="Evaluation",
            subcategory="fold {fold}",
            labels=report_labels("worst cases", "fold {fold}"),
        ),
    params:
        config=evaluation_config_json(),
        predictions=subpath(input.table, parent=True),
        truth=truth_argument,
        out=subpath(output.summary, parent=True),
        read=read_arguments(),
    log:
        "results/{dataset}/logs/evaluate_fold{fold}.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_fold{fold}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{MEDSEG} evaluate --predictions {params.predictions} --truth {params.truth} --config-json {params.config:q}"
        " --model-json {input.model} --manifest {input.manifest} {params.read} --out {params.out} > {log} 2>&1"
