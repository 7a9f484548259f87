"""Cohort cards: validation errors name the card and key; indexing maps labels and keeps bad rows apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mimm_med.data.cohort_card import CardError, CohortCard
from mimm_med.data.standins import generate_cohort

CARDS = Path(__file__).parents[1] / "cohorts"
RECORD_COLUMNS = {
    "ukb": ["source_id", "image", "sex", "age", "age_group", "site", "cohort"],
    "nako": ["source_id", "image", "sex", "age", "age_group", "site", "cohort"],
    "chexpert": ["source_id", "image", "effusion", "sex", "age", "age_group", "devices", "view", "cohort"],
    "chexpert_plus": ["source_id", "image", "effusion", "sex", "age", "age_group", "devices", "view", "cohort"],
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    return {
        kind: generate_cohort(
            kind, 5, root / kind, seed=4, resolution_mm=4.0 if kind in ("ukb", "nako") else None, progress=False
        )
        for kind in RECORD_COLUMNS
    }


def _card(tmp_path: Path, name: str, edit=None) -> CohortCard:
    """A shipped card, optionally edited, written to ``tmp_path`` and loaded."""
    spec = yaml.safe_load((CARDS / f"{name}.yaml").read_text())
    if edit:
        edit(spec)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return CohortCard.from_yaml(path)


def test_shipped_cards_validate_and_point_at_existing_pipelines():
    cards = {path.stem: CohortCard.from_yaml(path) for path in sorted(CARDS.glob("*.yaml"))}
    assert set(cards) == {"ukb", "nako", "chexpert", "chexpert_plus", "digits"}
    for name, card in cards.items():
        assert card.name == name
        assert card.pipeline is None if name == "digits" else card.pipeline.is_file()
    assert cards["ukb"].label_values == {
        "sex": ["female", "male"],
        "age": None,
        "age_group": ["young", "old"],
        "site": ["cheadle", "reading", "newcastle", "bristol"],
    }
    assert cards["chexpert"].label_values["effusion"] == [0, 1]
    assert cards["digits"].label_values == {"digit": [0, 1], "thickness": [0, 1], "rotation": [0, 1]}


@pytest.mark.parametrize("kind", ["ukb", "nako"])
def test_brain_cards_index_stand_ins_without_problems(raw, kind):
    records, problems = CohortCard.from_yaml(CARDS / f"{kind}.yaml").index(raw[kind])
    assert problems.empty, problems["reason"].tolist()
    assert list(records.columns) == RECORD_COLUMNS[kind] and len(records) == 5
    assert records["image"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert set(records["sex"]) <= {"female", "male"} and (records["cohort"] == kind).all()
    assert records["age"].dtype == float
    assert (records["age_group"] == records["age"].map(lambda a: "old" if a >= 60 else "young")).all()
    assert records["source_id"].str.fullmatch(r"\d{7}" if kind == "ukb" else r"\d{6}").all()


def _frontal_rows(raw_dir: Path, kind: str) -> pd.DataFrame:
    if kind == "chexpert":
        table = pd.concat([pd.read_csv(raw_dir / f"{s}.csv") for s in ("train", "valid")])
        return table[table["Frontal/Lateral"] == "Frontal"].rename(columns={"Sex": "sex"})
    table = pd.read_csv(raw_dir / "df_chexpert_plus.csv")
    return table[table["frontal_lateral"] == "Frontal"]


@pytest.mark.parametrize("kind", ["chexpert", "chexpert_plus"])
def test_chexpert_cards_keep_frontal_views_and_drop_only_uncertain_or_unknown(raw, kind):
    records, problems = CohortCard.from_yaml(CARDS / f"{kind}.yaml").index(raw[kind])
    frontal = _frontal_rows(raw[kind], kind)
    expected = (frontal["Pleural Effusion"] == -1.0) | (frontal["sex"] == "Unknown")
    assert len(records) == (~expected).sum() and len(problems) == expected.sum()
    assert problems["reason"].str.contains("uncertain|not one of the card's values").all()
    assert list(records.columns) == RECORD_COLUMNS[kind]
    assert not records["image"].str.contains("lateral").any()
    assert set(records["effusion"]) <= {0, 1} and set(records["devices"]) <= {0, 1}
    assert set(records["view"]) <= {"ap", "pa"} and set(records["sex"]) <= {"female", "male"}
    assert records["source_id"].str.fullmatch(r"patient\d{5}").all()


def test_uncertain_and_blank_policies(raw, tmp_path):
    def policy(uncertain, blank):
        def edit(spec):
            spec["labels"]["effusion"].update(uncertain=uncertain, blank=blank)

        return _card(tmp_path, "chexpert", edit).index(raw["chexpert"])

    frontal = _frontal_rows(raw["chexpert"], "chexpert")
    known = frontal.loc[frontal["sex"] != "Unknown", "Pleural Effusion"]
    assert (known == -1.0).any() and known.isna().any()
    for uncertain, counted_as in (("u_ones", 1), ("u_zeros", 0)):
        records, problems = policy(uncertain, "zero")
        assert len(records) == len(known) and not problems["reason"].str.contains("effusion").any()
        positives = (known == 1.0).sum() + (known == -1.0).sum() * counted_as
        assert (records["effusion"] == 1).sum() == positives
    records, problems = policy("drop", "drop")
    assert len(records) == known.isin([0.0, 1.0]).sum()
    assert problems["reason"].str.contains("blank: drop").sum() == known.isna().sum()


def test_planted_bad_rows_become_problems_and_the_rest_survive(raw, tmp_path):
    cohort = tmp_path / "ukb"
    shutil.copytree(raw["ukb"], cohort)
    table_path = tmp_path / "ukb_phenotypes.csv"
    lines = (raw["ukb"] / "ukb_phenotypes.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines]  # eid, sex, age, centre, date
    planted = [
        ["9999999", *rows[1][1:]],  # no image on disk
        [rows[2][0], "9", *rows[2][2:]],  # sex outside the coding
        [rows[3][0], rows[3][1], "", *rows[3][3:]],  # blank age
        [*rows[1], "surplus", "fields"],  # unreadable: too many fields
    ]
    kept = [lines[0], lines[1], lines[4], lines[5], *(",".join(row) for row in planted)]
    table_path.write_text("\n".join(kept) + "\n")

    def edit(spec):
        spec["metadata"]["tables"] = "../ukb_phenotypes.csv"

    records, problems = _card(tmp_path, "ukb", edit).index(cohort)
    assert sorted(records["source_id"]) == sorted(rows[i][0] for i in (1, 4, 5))
    reasons = problems.set_index("source_id")["reason"]
    assert reasons["9999999"] == "image file missing: 9999999_20252_2_0/T1/T1.nii.gz"
    assert reasons[rows[2][0]] == "sex: value '9' in column '31-0.0' is not one of the card's values ['0', '1']"
    assert reasons[rows[3][0]] == "age: column '21003-2.0' is blank; age_group: column '21003-2.0' is blank"
    assert reasons[""] == "unreadable row: expected 5 fields, saw 7"
    table = "../ukb_phenotypes.csv"
    assert problems.set_index("source_id")["row"].to_dict() == {
        "9999999": f"{table}, line 5", rows[2][0]: f"{table}, line 6", rows[3][0]: f"{table}, line 7",
        "": f"{table}, line 8",
    }
    assert set(problems.columns) == {"source_id", "image", "row", "reason", "cohort"}


def test_rows_are_placed_by_their_line_past_blank_lines_and_quoted_line_breaks(raw, tmp_path):
    lines = (raw["ukb"] / "ukb_phenotypes.csv").read_text().splitlines()
    eids = [line.split(",")[0] for line in lines[1:4]]
    table = tmp_path / "table.csv"
    table.write_text(
        f"{lines[0]}\n"  # line 1: eid, sex, age, centre, date
        f"{lines[1]}\n"
        "\n"
        f'{eids[1]},1,61,11027,"2017-10-16\nnote"\n'  # lines 4-5: one row
        f"{eids[2]},9,61,11027\n"  # line 6: a field short, a sex outside the coding
        ",1,61,11027,2017-10-16\n"  # line 7: no id
    )

    def edit(spec):
        spec["metadata"]["tables"] = str(table)

    records, problems = _card(tmp_path, "ukb", edit).index(raw["ukb"])
    assert sorted(records["source_id"]) == sorted(eids[:2])
    rows = problems.set_index("row")
    assert sorted(rows.index) == [f"{table}, line 6", f"{table}, line 7"]
    assert rows.loc[f"{table}, line 6", "reason"].startswith("sex: value '9' in column '31-0.0'")
    assert rows.loc[f"{table}, line 7", "source_id"] == ""
    assert rows.loc[f"{table}, line 7", "reason"].startswith("no subject id in column 'eid'")


def test_a_quote_never_closed_loses_only_its_own_row(raw, tmp_path):
    """A stray opening quote took every later line as one field: their rows vanished without a problem."""
    lines = (raw["ukb"] / "ukb_phenotypes.csv").read_text().splitlines()
    eids = [line.split(",")[0] for line in lines[1:5]]
    table = tmp_path / "table.csv"
    table.write_text(
        f"{lines[0]},note\n"
        f'{lines[1]},"a closed\nline break"\n'  # lines 2-3: one row
        f'{lines[2]},"a stray quote\n'  # line 4: the quote is never closed
        f"{lines[3]},ok\n"
        f"{lines[4]},ok\n"
    )

    def edit(spec):
        spec["metadata"]["tables"] = str(table)

    records, problems = _card(tmp_path, "ukb", edit).index(raw["ukb"])
    assert sorted(records["source_id"]) == sorted([eids[0], eids[2], eids[3]])
    assert problems["row"].tolist() == [f"{table}, line 4"]
    assert problems["reason"].iloc[0].startswith('unreadable row: it opens a quote (") that no later line closes')


def test_a_free_text_field_over_128_kib_is_read(raw, tmp_path):
    """csv's default field limit stopped the whole index at one long report in a column the card does not use."""
    lines = (raw["ukb"] / "ukb_phenotypes.csv").read_text().splitlines()
    table = tmp_path / "table.csv"
    table.write_text(f"{lines[0]},report\n{lines[1]},\"{'x' * 200_000}\"\n{lines[2]},short\n")

    def edit(spec):
        spec["metadata"]["tables"] = str(table)

    records, problems = _card(tmp_path, "ukb", edit).index(raw["ukb"])
    assert len(records) == 2 and problems.empty


def test_table_with_only_a_header_row_is_an_error_naming_it(raw, tmp_path):
    header = (raw["ukb"] / "ukb_phenotypes.csv").read_text().splitlines()[0]
    (tmp_path / "table.csv").write_text(header + "\n")

    def edit(spec):
        spec["metadata"]["tables"] = str(tmp_path / "table.csv")

    with pytest.raises(CardError, match=rf"metadata\.tables: {tmp_path / 'table.csv'} has a header row but no data"):
        _card(tmp_path, "ukb", edit).index(raw["ukb"])


def test_images_without_a_table_row_are_found_with_their_id(raw, tmp_path):
    cohort = tmp_path / "ukb"
    shutil.copytree(raw["ukb"], cohort)
    orphan = cohort / "5000099_20252_2_0" / "T1" / "T1.nii.gz"
    orphan.parent.mkdir(parents=True)
    shutil.copy(next(cohort.glob("*/T1/T1.nii.gz")), orphan)
    (cohort / "5000098_20252_2_0" / "T1").mkdir(parents=True)  # no image file: not unlisted, just a folder
    (cohort / "5000098_20252_2_0" / "T1" / "T1_brain.nii.gz").touch()  # another file: outside the pattern
    scan = CohortCard.from_yaml(CARDS / "ukb.yaml").scan(cohort)
    assert scan.unlisted.to_dict("records") == [
        {"source_id": "5000099", "image": str(orphan.resolve()), "cohort": "ukb"}
    ]
    assert len(scan.records) == 5 and scan.problems.empty
    assert CohortCard.from_yaml(CARDS / "chexpert.yaml").scan(raw["chexpert"]).unlisted.empty  # a path column


def test_chexpert_row_with_unmappable_sex_and_a_missing_file(raw, tmp_path):
    cohort = tmp_path / "chexpert"
    shutil.copytree(raw["chexpert"], cohort)
    valid = pd.read_csv(raw["chexpert"] / "valid.csv")
    train = pd.read_csv(raw["chexpert"] / "train.csv")
    bad = train.iloc[[0, 0]].copy()
    bad["Sex"] = ["X", "Female"]
    bad["Path"] = [bad["Path"].iloc[0], "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"]
    for name, table in (("train.csv", pd.concat([train.iloc[1:], bad])), ("valid.csv", valid)):
        table.to_csv(tmp_path / name, index=False)

    def edit(spec):
        spec["metadata"]["tables"] = ["../train.csv", "../valid.csv"]
        spec["labels"]["effusion"]["uncertain"] = "u_ones"
        spec["labels"]["sex"]["values"]["Unknown"] = "unknown"

    records, problems = _card(tmp_path, "chexpert", edit).index(cohort)
    assert len(problems) == 2
    assert problems["reason"].iloc[0] == (
        "sex: value 'X' in column 'Sex' is not one of the card's values ['Female', 'Male', 'Unknown']"
    )
    assert problems["reason"].iloc[1] == "image file missing: train/patient99999/study1/view1_frontal.jpg"
    assert problems["source_id"].tolist() == [bad["Path"].iloc[0].split("/")[2], "patient99999"]
    frontal = pd.concat([train.iloc[1:], valid])
    assert len(records) == (frontal["Frontal/Lateral"] == "Frontal").sum()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("name"), r"ukb\.yaml: name: missing"),
        (lambda s: s.update(modality="ct"), r"ukb\.yaml: modality: unknown modality 'ct'"),
        (lambda s: s.update(colour="red"), r"ukb\.yaml: unknown key\(s\) \['colour'\]"),
        (lambda s: s["labels"]["sex"].update(type="ordinal"), r"labels\.sex\.type: unknown label type 'ordinal'"),
        (lambda s: s["labels"]["sex"].pop("column"), r"labels\.sex\.column: missing"),
        (
            lambda s: s["labels"]["age_group"]["bins"].update(names=["a"]),
            r"labels\.age_group\.bins\.names: 1 edges make 2 bins",
        ),
        (
            lambda s: s["labels"]["age_group"]["bins"].update(edges=[60, 40]),
            r"labels\.age_group\.bins\.edges: expected strictly",
        ),
        (lambda s: s["labels"]["age"].update(range=[90, 10]), r"labels\.age\.range: expected \[low, high\]"),
        (lambda s: s["images"].update(column="Path"), r"images: give exactly one of 'pattern'"),
        (lambda s: s["images"].update(pattern="T1.nii.gz"), r"images\.pattern: 'T1\.nii\.gz' has no \{column\} field"),
        (
            lambda s: s["metadata"].update(subject={"column": "eid", "regex": "\\d+"}),
            r"metadata\.subject\.regex: .* needs a \(group\)",
        ),
        (lambda s: s["labels"].update(image={"type": "constant", "value": 1}), r"labels\.image: 'image' is a column"),
        # mimm-med's own columns: a label named so was overwritten (status), broke the manifest (subject_id) or the scan (row)
        *[
            (lambda s, name=name: s["labels"].update({name: s["labels"].pop("sex")}), rf"labels\.{name}: '{name}' is a column that mimm-med gives")
            for name in ("status", "subject_id", "row", "reason", "source_id")
        ],
    ],
)
def test_card_errors_name_the_card_file_and_the_key(tmp_path, edit, message):
    with pytest.raises(CardError, match=message):
        _card(tmp_path, "ukb", edit)


def test_finding_policy_typo_names_the_choices(tmp_path):
    def edit(spec):
        spec["labels"]["effusion"]["uncertain"] = "ones"

    with pytest.raises(
        CardError, match=r"labels\.effusion\.uncertain: unknown policy 'ones'; choose one of \['u_ones'"
    ):
        _card(tmp_path, "chexpert", edit)


def test_missing_table_or_column_stops_with_the_file_and_columns(raw, tmp_path):
    with pytest.raises(CardError, match=r"ukb_phenotypes\.csv not found"):
        CohortCard.from_yaml(CARDS / "ukb.yaml").index(tmp_path)

    def edit(spec):
        spec["labels"]["sex"]["column"] = "31-0.1"

    with pytest.raises(CardError, match=r"lacks column\(s\) \['31-0\.1'\]"):
        _card(tmp_path, "ukb", edit).index(raw["ukb"])


def test_digits_card_says_the_set_is_generated():
    with pytest.raises(CardError, match=r"generated in memory by mimm_med\.data\.digits_morpho"):
        CohortCard.from_yaml(CARDS / "digits.yaml").index("anywhere")


def _ukb_copy(raw: dict[str, Path], tmp_path: Path, rows) -> tuple[Path, list[list[str]]]:
    """The ukb stand-in in ``tmp_path`` with its table's rows edited by ``rows(header, rows) -> lines``."""
    cohort = tmp_path / "ukb"
    shutil.copytree(raw["ukb"], cohort)
    lines = (raw["ukb"] / "ukb_phenotypes.csv").read_text().splitlines()
    table = [line.split(",") for line in lines]
    (cohort / "ukb_phenotypes.csv").write_text("\n".join(",".join(row) for row in rows(table)) + "\n")
    return cohort, table


def test_subject_ids_read_as_floats_find_their_images_and_leading_zeros_stay(raw, tmp_path):
    # a table once loaded by pandas with a blank eid is saved with eids as 1000001.0
    cohort, table = _ukb_copy(raw, tmp_path, lambda t: [t[0], *([f"{r[0]}.0", *r[1:]] for r in t[1:]),
                                                        ["0012345", *t[1][1:]]])
    records, problems = CohortCard.from_yaml(CARDS / "ukb.yaml").index(cohort)
    assert sorted(records["source_id"]) == sorted(row[0] for row in table[1:])
    assert problems["source_id"].tolist() == ["0012345"]  # not 12345: the id is text, not a number
    assert problems["reason"].tolist() == ["image file missing: 0012345_20252_2_0/T1/T1.nii.gz"]


def test_a_missing_image_beside_an_uncompressed_twin_names_it_and_the_fix(raw, tmp_path):
    cohort, table = _ukb_copy(raw, tmp_path, lambda t: t)
    gzipped = cohort / f"{table[1][0]}_20252_2_0" / "T1" / "T1.nii.gz"
    gzipped.rename(gzipped.with_name("T1.nii"))  # stands for an uncompressed file: only the name is read here
    problems = CohortCard.from_yaml(CARDS / "ukb.yaml").index(cohort)[1]
    assert problems["reason"].tolist() == [
        f"image file missing: {table[1][0]}_20252_2_0/T1/T1.nii.gz (T1.nii is there; images.pattern names one file "
        "per row: (un)compress the files that differ, or name each row's file in a table column given as "
        "images.column)"
    ]


def test_rows_naming_one_image_with_conflicting_labels_are_all_problems(raw, tmp_path):
    def rows(t):
        other_sex = [t[1][0], "1" if t[1][1] == "0" else "0", *t[1][2:]]
        return [t[0], *t[1:], other_sex, t[2]]  # line 7: row 1 with the other sex; line 8: row 2 once more

    cohort, table = _ukb_copy(raw, tmp_path, rows)
    records, problems = CohortCard.from_yaml(CARDS / "ukb.yaml").index(cohort)
    eid = table[1][0]
    assert eid not in set(records["source_id"])  # neither sex can be trusted
    assert sorted(records["source_id"]) == sorted(row[0] for row in table[2:])  # the exact repeat loses only itself
    reasons = problems.set_index("row")["reason"]
    assert list(reasons.index) == [f"ukb_phenotypes.csv, line {n}" for n in (2, 7, 8)]
    assert "listed again by ukb_phenotypes.csv, line 7 with another sex" in reasons["ukb_phenotypes.csv, line 2"]
    assert reasons["ukb_phenotypes.csv, line 7"].endswith("is listed by an earlier row too, with another sex")
    assert reasons["ukb_phenotypes.csv, line 8"].endswith("is listed by an earlier row too")


@pytest.mark.parametrize(
    "rewrite, message",
    [
        (lambda text: text.replace("31-0.0", " 31-0.0", 1), r"'31-0\.0' \(labels\.sex\.column\).*'31-0\.0' is spelt ' 31-0\.0'"),
        (lambda text: text.replace("21003-2.0", "age", 1), r"'21003-2\.0' \(labels\.age\.column, labels\.age_group\.column\)"),
        (lambda text: text.replace(",", ";"), r"the header is one field: is the table separated by ';'"),
        # before: no hint that the Research Analysis Platform names 31-0.0 and 21003-2.0 so
        (lambda text: text.replace("31-0.0", "p31", 1).replace("21003-2.0", "p21003_i2", 1),
         r"'31-0\.0' is 'p31' in the table, UK Biobank's Research Analysis Platform naming: give 'p31' in the card's key; "
         r"'21003-2\.0' is 'p21003_i2'"),
    ],
    ids=["whitespace", "renamed", "semicolons", "research-analysis-platform"],
)
def test_missing_column_error_names_the_card_key_and_the_fix(raw, tmp_path, rewrite, message):
    cohort = tmp_path / "ukb"
    shutil.copytree(raw["ukb"], cohort)
    table = cohort / "ukb_phenotypes.csv"
    table.write_text(rewrite(table.read_text()))
    with pytest.raises(CardError, match=message) as error:
        CohortCard.from_yaml(CARDS / "ukb.yaml").index(cohort)
    assert str(table) in str(error.value)
    assert "name the table's column in the card's key, or export the column" in str(error.value)


def test_a_filter_that_keeps_no_row_is_an_error_not_an_empty_cohort(raw, tmp_path):
    def edit(spec):
        spec["metadata"]["filter"] = {"Frontal/Lateral": "frontal"}  # the table writes Frontal

    with pytest.raises(
        CardError, match=r"metadata\.filter: keeps none of the \d+ rows .*'Frontal/Lateral' holds \['Frontal', 'Lateral'\]"
    ):
        _card(tmp_path, "chexpert", edit).index(raw["chexpert"])


def test_a_card_path_that_is_a_folder_is_a_card_error(tmp_path):
    with pytest.raises(CardError, match=r"is a folder; pass a cohort card file"):
        CohortCard.from_yaml(tmp_path)
