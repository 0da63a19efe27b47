rule phantoms:
    """Synthetic chest radiographs (DICOM CR) with SCR-layout masks."""
    output:
        directory("results/{dataset}/raw"),
    params:
        n=config["phantoms"]["n"],
        seed=config["phantoms"]["seed"],
        height=config["phantoms"]["height"],
        width=config["phantoms"]["width"],
        spacing=config["phantoms"]["pixel_spacing_mm"],
    log:
        "results/{dataset}/logs/phantoms.log",
    benchmark:
        "results/{dataset}/benchmarks/phantoms.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        "{MEDSEG} phantoms --out {output} --n {params.n} --seed {params.seed}"
        " --height {params.height} --width {params.width} --pixel-spacing {params.spacing}"
        " > {log} 2>&1"
