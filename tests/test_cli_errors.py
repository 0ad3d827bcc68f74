"""Bad slide files through the CLI: non-zero exit, one-line error naming the file, no traceback."""

import subprocess
import sys

import numpy as np
import pytest

from biopsy.cli import main
from biopsy.errors import SlideError
from biopsy.cli.batch import comparison_folder, score_folder, segment_folder


@pytest.fixture
def bad_files(tmp_path, svs_path, dicom_path, real_glomeruli) -> dict:
    """Each kind of bad input, by name: (path, extra arguments)."""
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(svs_path.read_bytes()[:1_900_000])  # image data cut, header intact
    random_bytes = tmp_path / "random.svs"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(50_000))
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    truncated_dicom = tmp_path / "truncated.dcm"
    truncated_dicom.write_bytes(dicom_path.read_bytes()[:800_000])  # 20 of its 42 frames whole
    directory = tmp_path / "folder.svs"
    directory.mkdir()
    jpeg = sorted((real_glomeruli / "images").glob("*.jpg"))[0]
    return {"truncated": truncated, "random": random_bytes, "empty": empty, "directory": directory,
            "missing": tmp_path / "missing.svs", "jpeg_without_mpp": jpeg,
            "truncated_dicom": truncated_dicom}


CASES = [("info", "truncated"), ("info", "random"), ("info", "empty"), ("info", "directory"),
         ("info", "missing"), ("tissue", "truncated"), ("tissue", "random"),
         ("tissue", "jpeg_without_mpp"), ("info", "truncated_dicom")]


def command(name: str, path, tmp_path) -> list[str]:
    return [name, str(path)] + (["--out", str(tmp_path / "out")] if name == "tissue" else [])


@pytest.mark.parametrize("name, case", CASES)
def test_bad_input_gives_one_line_error(name, case, bad_files, tmp_path, capsys):
    path = bad_files[case]
    assert main(command(name, path, tmp_path)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"biopsy {name}: error: ")
    assert str(path) in lines[0]
    if case == "jpeg_without_mpp":
        assert "--mpp" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_fluorescence_slide_is_not_scored_by_the_brightfield_model(qptiff_path, tmp_path, capsys):
    """The real Vectra file has three channels, as the bundled model takes: it was scored (0
    glomeruli, its tissue called artery) and the folder written."""
    assert main(["score", str(qptiff_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert str(qptiff_path) in error and "a fluorescence slide, and the model was trained on " \
        "brightfield slides" in error
    assert "learnt from synthetic slides only" not in error  # of a model that cannot take it
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--scales", "1", "1e6"], "--scales: '1e6' is not a number from 0.25 to 4"),
    (["--mpp-search", "1", "1e9"], "--mpp-search: '1e9' is not a number from 0.25 to 4"),
    (["--output-mpp", "1e-3"], "--output-mpp: '1e-3' is not a number from 0.05 to 20"),
])
def test_reading_options_outside_their_range_are_refused(svs_path, tmp_path, capsys, arguments,
                                                         message):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(svs_path), "--out", str(tmp_path / "out"), *arguments])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bad_input_through_the_installed_command(bad_files, tmp_path):
    """The real process: exit status 2, one line on stderr, no traceback (run side by side)."""
    runs = [subprocess.Popen([sys.executable, "-m", "biopsy", *command(name, bad_files[case], tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, case in (("info", "truncated"), ("tissue", "jpeg_without_mpp"))]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("name", ["tissue", "segment", "synth"])
def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(name, svs_path, tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("")
    out = afile / "out"
    from biopsy.model import DEFAULT_CHECKPOINT

    arguments = {"tissue": [str(svs_path)], "synth": [],
                 "segment": [str(svs_path), "--model", str(DEFAULT_CHECKPOINT)]}[name]
    assert main([name, *arguments, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"biopsy {name}: error: {out}: Not a directory"]


def test_score_finds_an_output_folder_that_cannot_be_made_before_it_loads_a_model(
        svs_path, tmp_path, capsys, monkeypatch):
    """It segmented and scored the slide first (38 s for the small CMU slide)."""
    from biopsy.cli import score

    monkeypatch.setattr(score, "load_model_from_args", lambda *args: pytest.fail("model loaded"))
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    assert main(["score", str(svs_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"biopsy score: error: {out}: Not a directory"


@pytest.mark.parametrize("name, stop", [("segment", SlideError("unreadable tile")),
                                        ("score", KeyboardInterrupt())])
def test_a_command_that_fails_or_is_stopped_leaves_no_empty_output_folder_it_made(
        name, stop, svs_path, tmp_path, monkeypatch):
    import biopsy.infer
    import biopsy.pipeline

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(biopsy.infer, "segment_slide", stopped)
    monkeypatch.setattr(biopsy.pipeline, "score_slide_file", stopped)
    made, kept = tmp_path / "made" / "out", tmp_path / "kept" / "out"
    kept.parent.mkdir()
    (kept.parent / "notes.txt").write_text("")
    for out in (made, kept):
        assert main([name, str(svs_path), "--out", str(out)]) in (2, 130)
    assert not (tmp_path / "made").exists() and not kept.exists() and kept.parent.is_dir()
    kept.mkdir()  # an --out that was there before is kept, empty or not
    assert main([name, str(svs_path), "--out", str(kept)]) in (2, 130) and kept.is_dir()
    # x/.. is kept's parent once x is made: kept was removed as if the command had made it
    through_x = tmp_path / "x" / ".." / "kept" / "out" / "new"
    assert main([name, str(svs_path), "--out", str(through_x)]) in (2, 130) and kept.is_dir()


def test_a_command_writing_a_file_leaves_no_empty_folders_it_made(svs_path, tmp_path,
                                                                   monkeypatch):
    """restain stopped while writing left new/sub/ (its writer makes the file's folder)."""
    import biopsy.restain

    def stopped_while_writing(slide, out, *args, **kwargs):
        out.parent.mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(biopsy.restain, "restain_slide", stopped_while_writing)
    assert main(["restain", str(svs_path), str(tmp_path / "new" / "sub" / "copy.svs")]) == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, marker, holds", [("segment", "summary.json", "a scored slide"),
                                                 ("score", "segment.json", "a segmentation")])
def test_the_other_commands_folder_is_not_an_output_folder(name, marker, holds, svs_path,
                                                           tmp_path, capsys):
    """segment replaced a scored folder's label map and outlines under its summary.json, which
    then described another map (and compare took it)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main([name, str(svs_path), "--out", str(out)])
    assert exit_.value.code == 2 and f"{out} holds {holds} ({marker})" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tissue", "score", "segment", "synth", "compare", "batch"])
def test_an_empty_or_file_output_folder_is_refused(name, svs_path, tmp_path, capsys,
                                                    monkeypatch):
    """--out "" (an unset shell variable) wrote every output into the current folder."""
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "a-file"
    afile.write_text("")
    inputs = {"synth": [], "compare": [str(svs_path)] * 2}.get(name, [str(svs_path)])
    for out, message in (("", "an empty path; give the folder to write into"),
                         (str(afile), f"{afile} is a file; give a folder to write into")):
        with pytest.raises(SystemExit) as exit_:
            main([name, *inputs, "--out", out])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("name", ["segment", "score", "compare"])
def test_a_synthetic_slide_folder_is_not_an_output_folder(name, svs_path, tmp_path, capsys):
    """segment and score write labels.ome.tif where the synthetic slide keeps its truth's, and
    compare writes baseline/ and follow_up/ as a synthetic pair names its slides."""
    pair = tmp_path / "pair"
    for folder in (pair / "baseline", pair / "follow_up"):
        folder.mkdir(parents=True)
        (folder / "truth.geojson").write_text("{}")  # truth.json comes last: half written
        (folder / "labels.ome.tif").write_bytes(b"truth")
    inputs = [str(svs_path)] * (2 if name == "compare" else 1)
    refused = pair if name == "compare" else pair / "baseline"
    with pytest.raises(SystemExit) as exit_:
        main([name, *inputs, "--out", str(refused)])
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and "would replace the truth labels.ome.tif" in message
    assert (pair / "baseline" / "labels.ome.tif").read_bytes() == b"truth"
    other = pair / "baseline" if name == "compare" else pair  # writes beside the slides, not over
    assert {"compare": comparison_folder, "segment": segment_folder,
            "score": score_folder}[name](str(other)) == other


BAD_OPTIONS = [
    ("segment", ["--batch-size", "0"], "argument --batch-size: '0' is not a whole number >= 1"),
    ("segment", ["--workers", "-1"], "argument --workers: '-1' is not a whole number >= 0"),
    ("segment", ["--output-mpp", "0"], "argument --output-mpp: '0' is not a number from 0.05 to 20"),
    ("tissue", ["--mpp", "352.8"], "argument --mpp: '352.8' is not a number from 0.05 to 20"),
    ("score", ["--batch-size", "x"], "argument --batch-size: 'x' is not a whole number >= 1"),
    ("segment", ["--output-mpp", "-8"], "argument --output-mpp: '-8' is not a number from 0.05 to 20"),
    ("segment", ["--device", "foo"], "--device foo: not a torch device"),
    ("segment", ["--device", "meta"], "--device meta: biopsy runs on cpu or cuda"),
    ("score", ["--device", "cuda:99"], "--device cuda:99: "),
    ("tissue", ["--tissue-mpp", "0.5"], "argument --tissue-mpp: '0.5' is not a number from 1 to 64"),
    ("tissue", ["--min-area-um2", "-5"], "argument --min-area-um2: '-5' is not a number >= 0"),
    ("tissue", ["--min-area-um2", "inf"], "argument --min-area-um2: 'inf' is not a number >= 0"),
    ("restain", ["--quality", "101"], "argument --quality: '101' is not a whole number from 1 to 100"),
    ("restain", ["--hue", "nan"], "argument --hue: 'nan' is not a number from -360 to 360"),
    ("restain", ["--haematoxylin", "-1"], "argument --haematoxylin: '-1' is not a number >= 0"),
    ("synth", ["--seed", "-1"], "argument --seed: '-1' is not a whole number >= 0"),
    # 0 raised IndexError once both slides were scored; 1 gave a verdict on one replicate
    ("compare", ["--replicates", "0"], "argument --replicates: '0' is not a whole number >= 1000"),
]


@pytest.mark.parametrize("name, options, expected", BAD_OPTIONS)
def test_bad_options_are_refused_with_a_clear_error(name, options, expected, svs_path, tmp_path, capsys):
    from biopsy.model import DEFAULT_CHECKPOINT

    model = ["--model", str(DEFAULT_CHECKPOINT)] if name == "segment" else []
    inputs = {"synth": [], "restain": [str(svs_path), str(tmp_path / "out" / "copy.svs")],
              "compare": [str(svs_path)] * 2}
    out = [] if name == "restain" else ["--out", str(tmp_path / "out")]
    try:
        status = main([name, *inputs.get(name, [str(svs_path)]), *model, *out, *options])
    except SystemExit as exit:  # argparse's own refusal
        status = exit.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert expected in lines[-1] and lines[-1].startswith(f"biopsy {name}: error: ")
    assert not (tmp_path / "out").exists()


def test_the_file_systems_errors_name_the_users_path_and_others_keep_their_traceback(
        monkeypatch, capsys):
    import errno

    from biopsy.cli import info
    from biopsy.errors import user_message

    full = OSError(errno.ENOSPC, "No space left on device")
    renamed = OSError(errno.EISDIR, "Is a directory", "out/.mask.tmp-1.png", None, "out/mask.png")
    worker = OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert user_message(full) == "No space left on device"
    assert user_message(renamed) == "out/mask.png: Is a directory"  # the destination, not ours
    assert user_message(worker) is None

    def fails(args):
        raise worker

    monkeypatch.setattr(info, "run", fails)
    with pytest.raises(OSError, match="DataLoader worker"):  # not the user's: its traceback kept
        main(["info", "slide.svs"])


@pytest.mark.parametrize("device, refusal", [("cpu", None), ("cpu:0", None), (None, None),
                                             ("mps", "biopsy runs on cpu or cuda"),
                                             ("", "not a torch device"),
                                             ("cuda", "no CUDA GPU is available here")])
def test_devices_are_checked(device, refusal, monkeypatch):
    import torch

    from biopsy.errors import DeviceError
    from biopsy.pipeline import inference_options, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if refusal is None:
        assert resolve_device(device) == (device or "cpu")
    else:
        with pytest.raises(DeviceError, match=refusal):
            resolve_device(device)
    with pytest.raises(Exception, match="--int8 runs on the CPU"):  # said first, GPU or none
        inference_options("cuda:1", int8=True)


def test_the_command_runs_from_a_thread_other_than_the_main_one(tmp_path, capsys):
    """main() set its SIGTERM handler, which only the main thread may: it raised ValueError."""
    import threading

    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(["info", str(tmp_path / "none.svs")])))
    worker.start()
    worker.join()
    assert codes == [2] and "none.svs" in capsys.readouterr().err
