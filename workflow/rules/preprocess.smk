rule preprocess:
    """Images (+ masks) -> square NIfTI images, label bit fields, manifest."""
    input:
        images=images_input,
        masks=masks_input,
    output:
        manifest="results/{dataset}/preprocessed/manifest.csv",
        failures=report(
            "results/{dataset}/preprocessed/failures.csv",
            caption="../report/ingest_failures.rst",
            category="Data",
            labels=report_labels("ingest failures", "dataset {dataset}"),
        ),
    params:
        out=subpath(output.manifest, parent=True),
        images=images_argument,
        masks=masks_argument,
        read=f"{read_arguments()} {case_id_argument()}",
        label_values=label_values_argument(),
        structures=",".join(config["structures"]),
        size=config["preprocess"]["size"],
        lower=config["preprocess"]["lower_percentile"],
        upper=config["preprocess"]["upper_percentile"],
        tolerate="--tolerate-failures" if config["preprocess"]["tolerate_failures"] else "",
    log:
        "results/{dataset}/logs/preprocess.log",
    benchmark:
        "results/{dataset}/benchmarks/preprocess.tsv"
    threads: all_cores()
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{MEDSEG} preprocess --images {params.images} {params.masks} {params.label_values}"
        " --structures {params.structures} {params.read} --size {params.size}"
        " --lower-percentile {params.lower} --upper-percentile {params.upper}"
        " --workers {threads} {params.tolerate} --out {params.out} > {log} 2>&1"


rule splits:
    """Train / validation / test folds."""
    input:
        manifest="results/{dataset}/preprocessed/manifest.csv",
    output:
        "results/{dataset}/splits.json",
    params:
        scheme=config["splits"]["scheme"],
        k=config["splits"]["k"],
        seed=config["splits"]["seed"],
        val_fraction=config["splits"]["val_fraction"],
    log:
        "results/{dataset}/logs/splits.log",
    benchmark:
        "results/{dataset}/benchmarks/splits.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{MEDSEG} split --manifest {input.manifest} --scheme {params.scheme} --k {params.k}"
        " --seed {params.seed} --val-fraction {params.val_fraction} --out {output} > {log} 2>&1"


rule preview:
    """Contact sheet of preprocessed cases with their labels (a picture to check)."""
    input:
        manifest="results/{dataset}/preprocessed/manifest.csv",
    output:
        report(
            "results/{dataset}/preprocessed/preview.png",
            caption="../report/preview.rst",
            category="Data",
            labels=report_labels("preprocessed cases", "dataset {dataset}"),
        ),
    params:
        labels=json.dumps(config["labels"]),
    log:
        "results/{dataset}/logs/preview.log",
    benchmark:
        "results/{dataset}/benchmarks/preview.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{MEDSEG} preview --manifest {input.manifest} --labels {params.labels:q} --out {output} > {log} 2>&1"
