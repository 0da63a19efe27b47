"""Bad usage of `medseg predict` and `medseg evaluate` is exit status 2 with one
line naming the problem, found before any work and before any output folder
exists; every subcommand's --help works."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.cli import build_parser, main
from medseg.structures import SCR_STRUCTURES

from cli_runner import run_in_process as _run_in_process

MEDSEG = [sys.executable, "-m", "medseg"]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ERROR" in line or ": error:" in line]


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """An input folder with one file, a model file that exists, a prediction
    folder and an SCR-layout truth folder: every case below fails on its one
    bad option, not on missing inputs."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.png").write_bytes(b"not read")
    (tmp_path / "best.pt").write_bytes(b"not read")
    (tmp_path / "pred").mkdir()
    for structure in SCR_STRUCTURES:
        (tmp_path / "truth" / structure).mkdir(parents=True)
    return {"tmp": tmp_path, "out": tmp_path / "out"}


def _predict(f, *extra):
    return ["predict", f["tmp"] / "scans", "--model", f["tmp"] / "best.pt", "--out", f["out"], *extra]


def _evaluate(f, *extra):
    return ["evaluate", "--predictions", f["tmp"] / "pred", "--truth", f["tmp"] / "truth", "--out", f["out"],
            "--no-mlflow", *extra]


PREDICT_CASES = [
    (("--chunk", "3/3"), "argument --chunk: chunk 3 of 3: need 0 <= index < count"),
    (("--chunk", "4/3"), "argument --chunk: chunk 4 of 3: need 0 <= index < count"),
    (("--chunk", "0/0"), "argument --chunk: chunk 0 of 0: need 0 <= index < count"),
    (("--chunk=-1/3",), "argument --chunk: chunk '-1/3': expected I/N, e.g. 0/4"),
    (("--chunk", "2"), "argument --chunk: chunk '2': expected I/N, e.g. 0/4"),
    (("--chunk", "a/b"), "argument --chunk: chunk 'a/b': expected I/N, e.g. 0/4"),
    (("--chunk", "1/2/3"), "argument --chunk: chunk '1/2/3': expected I/N, e.g. 0/4"),
    (("--labels", '{"lungs": ["left_lung"]}'), "unrecognized arguments: --labels"),  # predict takes none
    (("--pixel-spacing", "0"), "argument --pixel-spacing: must be a positive number of mm, got 0"),
    (("--pixel-spacing=-0.35",), "argument --pixel-spacing: must be a positive number of mm, got -0.35"),
    (("--pixel-spacing", "nan"), "argument --pixel-spacing: must be a positive number of mm, got nan"),
    (("--push", "--no-seg"), "--push stores the DICOM SEG and structured report: leave out --no-seg"),
    (("--push-url", "https://alice:pw-9@pacs/dicom-web"), "--push-url https://pacs/dicom-web: credentials in the URL"),
    (("--push-url", "https://pacs/dicom-web?PatientID=X"), "without a query"),
    (("--push-url", "ftp://pacs/dicom-web"), "not a DICOMweb root"),
]


def _assert_one_usage_error(rc: int, text: str, message: str) -> None:
    """Exit 2 and exactly one error line, which holds ``message``."""
    assert rc == 2, text
    assert len(_error_lines(text)) == 1, text
    assert message in _error_lines(text)[0], text


@pytest.mark.parametrize("extra, message", PREDICT_CASES, ids=[" ".join(c[0]) for c in PREDICT_CASES])
def test_predict_bad_usage_is_exit_2(folders, capsys, caplog, extra, message):
    rc, text = _run_in_process(_predict(folders, *extra), capsys, caplog)
    _assert_one_usage_error(rc, text, message)
    assert not folders["out"].exists() and "pw-9" not in text


NOT_HTTP_CASES = [
    # Second fresh-user trial: an ftp:// input was looked for as a file path.
    ("ftp://alice:pw-9@pacs/export/IM1.dcm", "ftp://pacs/export/IM1.dcm: medseg reads files, folders, list files "
                                             "and DICOMweb sources (http:// or https://), not ftp://"),
    # Third: a mistyped scheme became a glob, its query (a patient) logged.
    ("http:/pacs/dicom-web/studies?PatientName=Secret*", "http:/pacs/dicom-web/studies...: a mistyped URL?"),
    ("HTTPS//pacs/dicom-web/studies?PatientID=SECRETID1", "HTTPS//pacs/dicom-web/studies...: a mistyped URL?"),
    # Fourth: without its scheme, or with a space in it.
    ("127.0.0.1:8042/dicom-web/studies?PatientID=SECRETID1", "127.0.0.1:8042/dicom-web/studies...: a mistyped URL?"),
    ("http ://pacs/dicom-web/studies?PatientID=SECRETID1", "http ://pacs/dicom-web/studies...: a mistyped URL?"),
]


@pytest.mark.parametrize("command", ["predict", "list-inputs"])
@pytest.mark.parametrize("url, message", NOT_HTTP_CASES, ids=["ftp", "http:/", "https//", "no-scheme", "space"])
def test_an_input_url_that_is_not_http_is_named_as_such(folders, capsys, caplog, command, url, message):
    argv = [command, folders["tmp"] / "scans", url, "--out", folders["out"]]
    rc, text = _run_in_process(argv + (["--model", folders["tmp"] / "best.pt"] if command == "predict" else []),
                               capsys, caplog)
    _assert_one_usage_error(rc, text, message)
    assert not folders["out"].exists() and "pw-9" not in text and "Secret" not in text and "SECRETID" not in text


def test_predict_missing_model_is_exit_2(folders, capsys, caplog):
    argv = _predict(folders)
    argv[argv.index("--model") + 1] = "/nonexistent/best.pt"
    rc, text = _run_in_process(argv, capsys, caplog)
    assert rc == 2, text
    assert len(_error_lines(text)) == 1, text
    assert "model /nonexistent/best.pt: file not found" in _error_lines(text)[0]
    assert not folders["out"].exists()


def test_predict_model_folder_is_exit_2_and_says_what_to_give(folders, capsys, caplog):
    argv = _predict(folders)
    argv[argv.index("--model") + 1] = folders["tmp"] / "pred"  # a folder, not an MLflow model folder
    rc, text = _run_in_process(argv, capsys, caplog)
    assert rc == 2, text
    assert len(_error_lines(text)) == 1 and "is a folder; give its best.pt" in _error_lines(text)[0], text
    assert not folders["out"].exists()


@pytest.mark.parametrize("command", ["predict", "ingest", "list-inputs"])
def test_missing_input_path_is_exit_2_naming_it(folders, capsys, caplog, command):
    """A mistyped input folder, alone or beside a good one: exit 2 and one
    line naming it (not the good one), before any output is written; not a
    batch of one failed "scan" with an empty overlay sheet."""
    tmp = folders["tmp"]
    missing, other = tmp / "scnas", tmp / "nope.dcm"
    for inputs, named in (([missing], [missing]), ([tmp / "scans", missing], [missing]),
                          ([missing, tmp / "scans", other], [missing, other])):
        if command == "predict":
            argv = ["predict", *inputs, "--model", tmp / "best.pt", "--out", folders["out"]]
        elif command == "list-inputs":
            argv = ["list-inputs", *inputs, "--out", folders["out"]]
        else:
            argv = ["ingest", *inputs]
        caplog.clear()
        rc, text = _run_in_process(argv, capsys, caplog)
        _assert_one_usage_error(rc, text, "not found")
        line = _error_lines(text)[0]
        assert all(str(path) in line for path in named), line
        assert str(tmp / "scans") not in line.replace(str(tmp / "scnas"), ""), line
        assert not folders["out"].exists()


def test_missing_file_in_a_list_file_is_that_input_s_failure(tmp_path, capsys, caplog):
    """A list file's line naming a file that is gone (since list-inputs ran)
    fails that input, and the rest goes on: exit 1, not 2."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.png'}\n{tmp_path / 'gone.png'}\n")
    rc, text = _run_in_process(["ingest", tmp_path / "list.txt", "--pixel-spacing", "0.2"], capsys, caplog)
    assert rc == 1, text
    assert f"{tmp_path / 'gone.png'}: file not found" in text
    assert "1 of 2 inputs failed" in text


def test_text_notes_named_among_images_are_one_failure_not_echoed(tmp_path, capsys, caplog):
    """`medseg ingest export/*` names a notes.txt from the export: it is not
    a list of inputs (none of its lines is a file), so it fails once as not
    an image and its lines (patient details, in a fresh user's trial) are
    written nowhere; a broken link in a walked folder is an input's failure,
    not a file that vanishes."""
    import numpy as np
    from PIL import Image

    export = tmp_path / "export"
    export.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(export / "a.png")
    (export / "notes.txt").write_text("Patient: DOE^JANE\nMRN PID-SECRET-12345 DOB 19600101\n")
    (export / "broken.png").symlink_to(tmp_path / "nowhere.png")
    argv = ["ingest", export / "a.png", export / "notes.txt", "--pixel-spacing", "0.2"]
    rc, text = _run_in_process(argv, capsys, caplog)
    assert rc == 1, text
    assert f"{export / 'notes.txt'}: not an image" in text and "1 of 2 inputs failed" in text
    assert "DOE" not in text and "PID-SECRET" not in text and "19600101" not in text
    caplog.clear()
    rc, text = _run_in_process(["ingest", export, "--pixel-spacing", "0.2"], capsys, caplog)
    assert rc == 1, text
    assert f"{export / 'broken.png'}: file not found" in text and "1 of 2 inputs failed" in text
    assert "DOE" not in text


EVALUATE_CASES = [
    (("--labels", "{lungs: [left_lung]}"),
     "argument --labels: not JSON (Expecting property name enclosed in double quotes at character 1)"),
    (("--labels", '["heart"]'), "argument --labels: expected a JSON object of label groups"),
    (("--labels", "{}"), "argument --labels: expected a JSON object of label groups"),
    (("--labels", '{"lungs": "left_lung"}'),
     "argument --labels: label 'lungs': expected a non-empty list of structure names, got \"left_lung\""),
    (("--labels", '{"lungs": []}'),
     "argument --labels: label 'lungs': expected a non-empty list of structure names, got []"),
    (("--labels", '{"lungs": ["left_lung", 3]}'), "label 'lungs': expected a non-empty list of structure names"),
    (("--labels", '{"lungs": ["left_lung", "lung"]}'), "labels use structures with no folder in"),
    (("--label-values", "heart=1"), "argument --label-values: expected VALUE=STRUCTURE, got 'heart=1'"),
    (("--model-json", "/nonexistent/model.json"), "--model-json /nonexistent/model.json: file not found"),
    (("--config", "/nonexistent/config.yaml"), "--config /nonexistent/config.yaml: file not found"),
    (("--chunk", "0/2"), "unrecognized arguments: --chunk 0/2"),  # evaluate takes no chunk
]


@pytest.mark.parametrize("extra, message", EVALUATE_CASES, ids=[" ".join(c[0]) for c in EVALUATE_CASES])
def test_evaluate_bad_usage_is_exit_2(folders, capsys, caplog, extra, message):
    rc, text = _run_in_process(_evaluate(folders, *extra), capsys, caplog)
    _assert_one_usage_error(rc, text, message)
    if "no folder" in message:
        assert _error_lines(text)[0].endswith(": lung")  # names the structure, not the good one
    assert not folders["out"].exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_bad_usage_exit_status_seen_by_the_shell(folders, command):
    """The same through a real process: status 2, one error line on stderr."""
    if command == "predict":
        argv = _predict(folders)
        argv[argv.index("--model") + 1] = "/nonexistent/best.pt"
        message = "model /nonexistent/best.pt: file not found"
    else:
        argv = _evaluate(folders, "--labels", '{"lungs": "left_lung"}')
        message = "label 'lungs': expected a non-empty list of structure names"
    proc = subprocess.run([*MEDSEG, *map(str, argv)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not folders["out"].exists()


# --------------------------------------------------------------------------- --help


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """The parser's own subcommands (so a new one is checked without a list to update)."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_there_are_subcommands_to_check():
    names = set(_subcommands())
    assert {"phantoms", "ingest", "preprocess", "split", "preview", "train", "predict", "gather-predictions",
            "evaluate", "list-cases", "list-inputs", "cv-start", "cv-finish", "tracking-server"} <= names


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medseg {command} "), out[:200]
    assert "options:" in out


def test_top_level_help_lists_every_subcommand():
    proc = subprocess.run([*MEDSEG, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: medseg ")
    # One line per subcommand, indented by 4 (wrapped help lines by more).
    listed = re.findall(r"^ {4}(\S+)", proc.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(_subcommands()), proc.stdout


def test_predict_with_a_registry_uri_and_no_store_here_is_exit_2(tmp_path, monkeypatch, capsys, caplog):
    """`models:/...` run from a folder without results/mlflow.db: one line
    naming the store looked in, exit 2, and no empty store left behind."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "scan.png")
    rc, text = _run_in_process(["predict", str(tmp_path / "scan.png"), "--model", "models:/medseg-x@candidate",
                                "--out", str(tmp_path / "out")], capsys, caplog)
    assert rc == 2, text
    assert len(_error_lines(text)) == 1, text
    assert f"no MLflow store at {tmp_path / 'results' / 'mlflow.db'}" in _error_lines(text)[0], text
    assert not (tmp_path / "results").exists()


def _evaluate_tracked(f, *extra):
    """evaluate with MLflow logging on (no --no-mlflow): the checks of the run's links."""
    return ["evaluate", "--predictions", f["tmp"] / "pred", "--truth", f["tmp"] / "truth", "--out", f["out"],
            "--tracking-uri", f"sqlite:///{f['tmp'] / 'mlflow.db'}", *extra]


def test_evaluate_refuses_links_it_cannot_make_before_any_work(folders, capsys, caplog):
    """--manifest missing, a model.json that is not one, predictions made by
    another model than --model-json's, an unreachable tracking server: exit
    2 and one line, before any output is written."""
    import json

    tmp = folders["tmp"]
    (tmp / "pred" / "CASE1").mkdir()
    (tmp / "pred" / "CASE1" / "prediction.json").write_text(json.dumps(
        {"case_id": "CASE1", "settings": {"model_uri": "models:/medseg-x/2", "threshold": 0.5}}))
    (tmp / "model.json").write_text(json.dumps({"model_uri": "models:/medseg-x/1", "fold": 0}))
    (tmp / "broken.json").write_text("{not json")
    cases = [
        (("--manifest", "/nonexistent/manifest.csv"), "--manifest /nonexistent/manifest.csv: file not found"),
        (("--model-json", tmp / "broken.json"), f"--model-json {tmp / 'broken.json'}: not a model.json"),
        (("--model-json", tmp / "model.json"),
         "is the model models:/medseg-x/1, but the predictions in"),
    ]
    for extra, message in cases:
        caplog.clear()
        rc, text = _run_in_process(_evaluate_tracked(folders, *extra), capsys, caplog)
        _assert_one_usage_error(rc, text, message)
        if "but the predictions" in message:  # names the model that made them
            assert "were made by models:/medseg-x/2" in _error_lines(text)[0]
        assert not folders["out"].exists()
    from services import free_port

    argv = _evaluate_tracked(folders)
    argv[argv.index("--tracking-uri") + 1] = f"http://127.0.0.1:{free_port()}"
    caplog.clear()
    rc, text = _run_in_process(argv, capsys, caplog)
    _assert_one_usage_error(rc, text, "cannot be used")
    assert not folders["out"].exists()


def test_cv_finish_names_a_bad_evaluation_summary(tmp_path, capsys, caplog):
    import json

    (tmp_path / "cv_run.json").write_text(json.dumps({"parent_run_id": "0" * 32}))
    (tmp_path / "fold0.json").write_text(json.dumps({"fold": 0, "best_metrics": {"val_dice_mean": 0.5}}))
    (tmp_path / "two.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "text.csv").write_text("label,dice_mean,jaccard_mean,hd95_mm_mean,assd_mm_mean\nheart,abc,1,1,1\n")
    (tmp_path / "twice.csv").write_text("label,dice_mean,jaccard_mean,hd95_mm_mean,assd_mm_mean\n"
                                        "heart,1,1,1,1\nheart,1,1,1,1\n")
    cases = {"two.csv": "not an evaluation summary.csv", "empty.csv": "unreadable",
             "text.csv": "non-numeric metric values", "twice.csv": "not an evaluation summary.csv",
             "missing.csv": "file not found"}
    for name, message in cases.items():
        path = tmp_path / name
        caplog.clear()
        rc, text = _run_in_process(["cv-finish", "--config-json", "{}", "--parent-run-file", tmp_path / "cv_run.json",
                                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--out",
                                    tmp_path / "summary.json", tmp_path / "fold0.json", "--evaluations", path],
                                   capsys, caplog)
        _assert_one_usage_error(rc, text, f"--evaluations {path}: {message}")
        if name == "twice.csv":
            assert _error_lines(text)[0].endswith("rows repeat a label)")
        assert not (tmp_path / "summary.json").exists()
