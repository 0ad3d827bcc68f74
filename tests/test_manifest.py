import pytest
from PIL import Image

from biopsy.errors import ManifestError
from biopsy.manifest import pair_timepoints, read_manifest, unpaired


def write_manifest(folder, text, slides=("a.svs", "b.svs", "c.svs", "d.svs")):
    for name in slides:
        (folder / name).write_bytes(b"")
    path = folder / "manifest.csv"
    path.write_text(text)
    return path


def test_reads_rows_resolves_paths_and_orders_timepoints(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.ome.tif").write_bytes(b"")
    path = write_manifest(tmp_path, "\ufeffpatient_id,timepoint,slide,stain,mpp,notes\n"
                                    "P1,POST,b.svs,PAS,0.25,second\n"
                                    "P1,pre,a.svs,PAS,,first\n"
                                    "P2,2024-06-01,c.svs,,,\n"
                                    "P2,2023-01-15,d.svs,,,\n"
                                    "P2,2025-01-01,sub/x.ome.tif,,,\n")
    entries = read_manifest(path)
    assert [e.row for e in entries] == [2, 3, 4, 5, 6]
    assert entries[0].timepoint == "post" and entries[0].mpp == 0.25 and entries[0].stain == "PAS"
    assert entries[1].mpp is None and entries[1].slide == (tmp_path / "a.svs").resolve()
    assert entries[4].folder_name == "P2_2025-01-01_x"
    pairs = pair_timepoints(entries)
    assert [(p.baseline.row, p.follow_up.row, p.follow_up_number) for p in pairs] == [
        (3, 2, 1), (5, 4, 1), (5, 6, 2)]


@pytest.mark.parametrize("text, message", [
    ("patient_id,slide\nP1,a.svs\n", "missing column(s) timepoint"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\nP1,during,b.svs\n", "row 3: unknown timepoint 'during'"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\nP1,2024-13-01,b.svs\n", "row 3: unknown timepoint"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\nP1,post,b.svs\nP1,post,c.svs\n",
     "row 4: duplicate of row 3 (same patient, timepoint and stain)"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\nP2,pre,a.svs\n",
     "row 3: duplicate of row 2 (same slide file)"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\nP1,post,missing.svs\n", "row 3: slide file"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\n,post,b.svs\n", "row 3: empty patient_id"),
    ("patient_id,timepoint,slide,mpp\nP1,pre,a.svs,-1\n", "row 2: mpp '-1'"),
    ("patient_id,timepoint,slide,mpp\nP1,pre,a.svs,25\n",
     "row 2: mpp '25' is not a slide's pixel size (0.05 to 20 µm/px)"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\nP1,2024-01-01,b.svs\n",
     "row 3: patient 'P1' mixes pre/post and dates (rows 2 and 3)"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs,extra\n", "row 2: more cells than header"),
    ("patient_id,timepoint,slide\nP1,pre,a.svs\n,,,x\n", "row 3: more cells than header"),
    # the second slide column was taken silently
    ("patient_id,timepoint,slide,Slide\nP1,pre,a.svs,b.svs\n", "column(s) slide appear more than once"),
    # blank lines went uncounted: the error named row 3
    ("patient_id,timepoint,slide\nP1,pre,a.svs\n\nP1,post,missing.svs\n", "row 4: slide file"),
    ("patient_id,timepoint,slide\n", "lists no slides"),
])
def test_malformed_manifest_is_refused_with_row_and_reason(tmp_path, text, message):
    path = write_manifest(tmp_path, text)
    with pytest.raises(ManifestError) as error:
        read_manifest(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "nope.csv")


def test_unsafe_patient_ids_give_safe_distinct_folder_names(tmp_path):
    path = write_manifest(tmp_path, "patient_id,timepoint,slide\n"
                                    "../<script>,pre,a.svs\nP/1,pre,b.svs\nP_1,post,c.svs\n")
    entries = read_manifest(path)
    assert entries[0].folder_name == "script_pre_a"
    assert all("/" not in e.folder_name for e in entries)
    # "P/1" and "P_1" are different patients whose folder names would collide at the same timepoint
    path = write_manifest(tmp_path, "patient_id,timepoint,slide\nP/1,pre,a.svs\nP_1,pre,a.ome.tif\n",
                          slides=("a.svs", "a.ome.tif"))
    with pytest.raises(ManifestError, match="row 3: duplicate of row 2 \\(same output folder name "
                                            "P_1_pre_a\\); rename one of the two slide files"):
        read_manifest(path)
    # Ids in other scripts keep their letters: two such patients are not both "1".
    path = write_manifest(tmp_path, "patient_id,timepoint,slide\n患者1,pre,a.svs\n病人1,pre,b.svs\n")
    assert [e.folder_name for e in read_manifest(path)] == ["患者1_pre_a", "病人1_pre_b"]


def test_stains_of_one_patient_and_timepoint_get_their_own_folders_and_pairs(tmp_path):
    """PAS and HE slides of one biopsy, named alike in a folder per stain or by a dotted name,
    and the stain spelled in another case at follow-up (it was refused, or left unpaired)."""
    for stain in ("pas", "he"):
        (tmp_path / stain).mkdir()
    path = write_manifest(tmp_path, "patient_id,timepoint,slide,stain\n"
                                    "P1,pre,pas/S1.A1.svs,PAS\n"
                                    "P1,pre,he/S1.A1.svs,HE\n"
                                    "P1,post,B21-123.PAS.ome.tif,pas\n"
                                    "P1,post,B21-123.HE.ome.tif,he\n"
                                    ",,,\n",  # a spreadsheet's empty trailing row
                          slides=("pas/S1.A1.svs", "he/S1.A1.svs", "B21-123.PAS.ome.tif",
                                  "B21-123.HE.ome.tif"))
    entries = read_manifest(path)
    # the stain in lower case: the names stay when another spelling comes first
    assert [e.folder_name for e in entries] == [
        "P1_pre_pas_S1.A1", "P1_pre_he_S1.A1", "P1_post_pas_B21-123.PAS", "P1_post_he_B21-123.HE"]
    assert [e.stain for e in entries] == ["PAS", "HE", "PAS", "HE"]
    assert [(p.baseline.row, p.follow_up.row) for p in pair_timepoints(entries)] == [(2, 4), (3, 5)]
    assert unpaired(entries) == []
    assert unpaired(entries[:3]) == [entries[1]]


def test_a_manifest_not_in_utf8_says_how_to_save_it(tmp_path):
    path = write_manifest(tmp_path, "")
    path.write_bytes("patient_id,timepoint,slide\nRen\xe9,pre,a.svs\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8 text .*; save the manifest as CSV UTF-8"):
        read_manifest(path)


def test_slides_without_a_pixel_size_refuse_the_manifest(tmp_path):
    """A snapshot row without mpp failed only when its turn came, hours into a cohort."""
    Image.new("RGB", (64, 48), "white").save(tmp_path / "snap.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")  # its row fails on its own
    path = write_manifest(tmp_path, "patient_id,timepoint,slide\nP1,pre,a.svs\nP1,post,b.svs\n"
                                    "P2,pre,snap.jpg\nP2,post,broken.jpg\n")
    with pytest.raises(ManifestError, match=r"mpp column \(µm/px\): row 4 \(.*snap.jpg: pixel "
                                            r"size unknown"):
        read_manifest(path)
    given = path.read_text().replace("slide\n", "slide,mpp\n")
    path.write_text(given.replace("snap.jpg", "snap.jpg,0.5"))
    assert read_manifest(path)[2].mpp == 0.5  # the row gives it


def test_column_names_match_whatever_their_case_and_empty_cells_past_the_header_are_ignored(tmp_path):
    """Stain and MPP were ignored: a PAS slide was compared with an HE one, and the row's pixel
    size dropped. An empty trailing cell was refused as 'more cells than header columns'."""
    path = write_manifest(tmp_path, "Patient_ID,TimePoint,Slide,Stain,MPP\n"
                                    "P1,pre,a.svs,PAS,0.25,\n"
                                    "P1,post,b.svs,HE,0.25\n")
    entries = read_manifest(path)
    assert [(e.row, e.stain, e.mpp) for e in entries] == [(2, "PAS", 0.25), (3, "HE", 0.25)]
    assert pair_timepoints(entries) == []
