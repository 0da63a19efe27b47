def truth_argument(wildcards, input):
    """Ground-truth masks of the dataset (SCR layout or label images)."""
    if config["source"] == "phantoms":
        return shlex.quote(str(Path(input.truth) / "masks"))
    args = f"{shlex.quote(input.truth)} --truth-format {config['mask_format']}"
    values = config.get("label_values") or {}
    if config["mask_format"] == "label_image" and values:
        args += " --label-values " + ",".join(f"{k}={v}" for k, v in values.items())
    return args


def predict_arguments():
    settings = config["predict"]
    args = [f"--threshold {settings['threshold']}", f"--batch-size {settings['batch_size']}"]
    if settings["tta"]:
        args.append("--tta")
    if not settings["postprocess"]:
        args.append("--no-postprocess")
    if not settings["write_seg"]:
        args.append("--no-seg")
    return " ".join(args)


rule test_cases:
    """The held-out test scans of one fold, as a list file for predict."""
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


rule predict:
    """Each fold's model on its own held-out scans, at their original geometry."""
    input:
        model="results/{dataset}/models/fold{fold}/model.json",
        scans="results/{dataset}/lists/test_fold{fold}.txt",
    output:
        table=report(
            "results/{dataset}/predictions/fold{fold}/results.csv",
            category="Prediction",
            subcategory="fold {fold}",
            labels={"table": "results"},
        ),
        ctr=report(
            "results/{dataset}/predictions/fold{fold}/ctr_distribution.png",
            category="Prediction",
            subcategory="fold {fold}",
            labels={"figure": "CTR distribution"},
        ),
        failures=report(
            "results/{dataset}/predictions/fold{fold}/failures.csv",
            category="Prediction",
            subcategory="fold {fold}",
            labels={"table": "failures"},
        ),
    params:
        out=subpath(output.table, parent=True),
        read=f"{read_arguments()} {case_id_argument()}",
        settings=predict_arguments(),
    log:
        "results/{dataset}/logs/predict_fold{fold}.log",
    benchmark:
        "results/{dataset}/benchmarks/predict_fold{fold}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "{MEDSEG} predict {input.scans} --model {input.model} --out {params.out} {params.read}"
        " {params.settings} > {log} 2>&1"


rule evaluate:
    """Dice, Jaccard, HD95, ASSD (mm) at the ground truth's resolution; MLflow evaluation run."""
    input:
        config="results/{dataset}/config.json",
        model="results/{dataset}/models/fold{fold}/model.json",
        table="results/{dataset}/predictions/fold{fold}/results.csv",
        truth=masks_input,
    output:
        summary=report(
            "results/{dataset}/evaluation/fold{fold}/summary.csv",
            category="Evaluation",
            subcategory="fold {fold}",
            labels={"table": "summary"},
        ),
        cases=report(
            "results/{dataset}/evaluation/fold{fold}/cases.csv",
            category="Evaluation",
            subcategory="fold {fold}",
            labels={"table": "per case"},
        ),
        boxplots=report(
            "results/{dataset}/evaluation/fold{fold}/boxplots.png",
            category="Evaluation",
            subcategory="fold {fold}",
            labels={"figure": "box plots"},
        ),
        worst=report(
            "results/{dataset}/evaluation/fold{fold}/worst_cases.png",
            category="Evaluation",
            subcategory="fold {fold}",
            labels={"figure": "worst cases"},
        ),
    params:
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
        "{MEDSEG} evaluate --predictions {params.predictions} --truth {params.truth} --config {input.config}"
        " --model-json {input.model} {params.read} --out {params.out} > {log} 2>&1"
