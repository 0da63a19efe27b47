rule mlflow_runs:
    """The run's MLflow run IDs and how to open the MLflow UI, for the
    report's main page.

    The main page (workflow/report/workflow.rst) is a fixed file, templated
    only with the config and the list of report items, so it cannot read a
    run's records itself. Snakemake 9 offers no ordering of categories that
    would put a category before the description either. So this rule writes
    the generated part as reStructuredText, marked for the report, and the
    main page includes it with the docutils ``include`` directive (Snakemake
    renders the page with docutils from the workflow's folder, where the
    relative path holds) when the item is in the report: a partial report
    (``snakemake <target> --report``) leaves it out instead of failing.
    """
    input:
        cv_run="results/{dataset}/models/cv_run.json",
        cv_summary="results/{dataset}/models/summary.json",
        models=expand("results/{{dataset}}/models/fold{fold}/model.json", fold=config["train_folds"]),
        # After the evaluations, whose mlflow_run.json records are read.
        evaluations=expand("results/{{dataset}}/evaluation/fold{fold}/summary.csv", fold=config["train_folds"]),
    output:
        report(
            "results/{dataset}/report/mlflow_runs.rst",
            caption="../report/mlflow_runs.rst",
            category="MLflow",
            labels=report_labels("run IDs", "dataset {dataset}"),
        ),
    params:
        evaluations=lambda wildcards, input: " ".join(shlex.quote(str(Path(p).parent)) for p in input.evaluations),
    log:
        "results/{dataset}/logs/mlflow_runs.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{MEDSEG} mlflow-runs --cv-run {input.cv_run} --cv-summary {input.cv_summary} --models {input.models}"
        " --evaluations {params.evaluations} --out {output} > {log} 2>&1"
