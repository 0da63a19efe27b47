rule resolved_config:
    """The whole resolved config, for the evaluation and the report."""
    output:
        report(
            "results/{dataset}/config.json",
            caption="../report/config.rst",
            category="Configuration",
            labels=report_labels("resolved config", "dataset {dataset}"),
        ),
    params:
        config=json.dumps(config),  # key order kept: it is the label channel order
    log:
        "results/{dataset}/logs/resolved_config.log",
    threads: 1
    resources:
        mem_mb=200,
        runtime=2,
    shell:
        "printf '%s\\n' {params.config:q} > {output} 2> {log}"


rule cv_start:
    """MLflow parent run of the cross-validation (folds nest under it)."""
    input:
        manifest="results/{dataset}/preprocessed/manifest.csv",
    output:
        "results/{dataset}/models/cv_run.json",
    params:
        config=training_config_json(),
    log:
        "results/{dataset}/logs/cv_start.log",
    benchmark:
        "results/{dataset}/benchmarks/cv_start.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{MEDSEG} cv-start --config-json {params.config:q} --manifest {input.manifest} --out {output} > {log} 2>&1"


rule train:
    """One fold. A rerun of an interrupted job resumes from its last.pt."""
    input:
        manifest="results/{dataset}/preprocessed/manifest.csv",
        splits="results/{dataset}/splits.json",
        cv_run="results/{dataset}/models/cv_run.json",
    output:
        # best.pt and last.pt are deliberately not outputs: Snakemake deletes
        # the outputs of an incomplete job, and the rerun resumes from them.
        summary="results/{dataset}/models/fold{fold}/model.json",
        curves=report(
            "results/{dataset}/models/fold{fold}/curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            subcategory="fold {fold}",
            labels=report_labels("training curves", "fold {fold}"),
        ),
        # The best epoch's predictions on up to 6 validation cases, written
        # when training ends.
        validation_overlays=report(
            "results/{dataset}/models/fold{fold}/validation_overlays.png",
            caption="../report/validation_overlays.rst",
            category="Training",
            subcategory="fold {fold}",
            labels=report_labels("validation overlays", "fold {fold}"),
        ),
    params:
        out=subpath(output.summary, parent=True),
        config=training_config_json(),
    log:
        "results/{dataset}/logs/train_fold{fold}.log",
    benchmark:
        "results/{dataset}/benchmarks/train_fold{fold}.tsv"
    threads: all_cores()
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "{MEDSEG} train --config-json {params.config:q} --manifest {input.manifest} --splits {input.splits}"
        " --fold {wildcards.fold} --parent-run-file {input.cv_run} --out {params.out} > {log} 2>&1"


rule cv_finish:
    """Summarise the folds and their evaluations into the cross-validation run
    and end it; alias the best fold's model (models:/<name>@candidate); the
    summary says what predicts new scans (predict.ensemble: the folds'
    ensemble, else the best fold)."""
    input:
        cv_run="results/{dataset}/models/cv_run.json",
        folds=expand("results/{{dataset}}/models/fold{fold}/model.json", fold=config["train_folds"]),
        # After the evaluations: their means go into the cross-validation run,
        # which ends here and so spans all of its nested runs.
        evaluations=expand("results/{{dataset}}/evaluation/fold{fold}/summary.csv", fold=config["train_folds"]),
    output:
        "results/{dataset}/models/summary.json",
    params:
        config=training_config_json(),
        choice="ensemble" if config["predict"].get("ensemble") else "best_fold",
    log:
        "results/{dataset}/logs/cv_finish.log",
    benchmark:
        "results/{dataset}/benchmarks/cv_finish.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{MEDSEG} cv-finish --config-json {params.config:q} --parent-run-file {input.cv_run} --out {output}"
        " {input.folds} --evaluations {input.evaluations} --choice {params.choice} > {log} 2>&1"
