"""Label map: the shipped default and the validation of broken YAML files."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from msk_node import codes
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, LabelMap, LabelSpec, load_label_map

EXPECTED_VALUES = {
    "femur": 1, "tibia": 2, "patella": 3, "femoral_cartilage": 4, "tibial_cartilage": 5,
    "patellar_cartilage": 6, "meniscus": 7, "subcutaneous_fat": 8, "quadriceps": 9, "hamstrings": 10,
    "adductors": 11, "sartorius": 12, "gracilis": 13, "femoral_cortex": 14, "femoral_marrow": 15,
    "vertebral_body": 16, "intervertebral_disc": 17,
}
KNEE = ("femur", "tibia", "patella", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage", "meniscus")
SPINE = ("vertebral_body", "intervertebral_disc")


@pytest.fixture(scope="module")
def default_map() -> LabelMap:
    return load_label_map(DEFAULT_LABEL_MAP_PATH)


def test_default_map_has_the_17_labels_with_fixed_values(default_map: LabelMap) -> None:
    assert len(default_map) == 17
    assert {spec.name: spec.value for spec in default_map} == EXPECTED_VALUES
    assert all(spec.class_id == spec.value - 1 for spec in default_map)
    assert default_map.anatomies == ("knee", "thigh", "spine")
    assert default_map.for_anatomy("knee").names == KNEE
    assert default_map.for_anatomy("spine").names == SPINE


def test_default_map_codes_match_msk_node_codes(default_map: LabelMap) -> None:
    for spec in default_map:
        category, property_type = codes.anatomy_codes(spec.name)
        assert spec.category == category and spec.property_type == property_type
        assert spec.category.scheme_designator == "SCT"
        assert spec.category.value in {"91723000", "85756007"}  # CID 7150 Anatomical Structure / Tissue
        assert spec.property_type.scheme_designator == "SCT" and spec.property_type.meaning


def test_default_map_display_and_post_processing_settings(default_map: LabelMap) -> None:
    assert len({spec.colour for spec in default_map}) == 17
    assert all(len(spec.colour) == 3 and all(0 <= c <= 255 for c in spec.colour) for spec in default_map)
    p = {spec.name: spec.priority for spec in default_map}
    # Cartilage and menisci lie on the bone surface, never inside it: a box-prompted
    # cartilage mask that spills into the condyle must not take bone pixels.
    for thin in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage", "meniscus"):
        assert p[thin] < min(p["femur"], p["tibia"], p["patella"])
    muscles = ("quadriceps", "hamstrings", "adductors", "sartorius", "gracilis")
    assert p["femoral_marrow"] > p["femoral_cortex"] > max(p[m] for m in muscles)
    assert min(p[m] for m in muscles) > p["subcutaneous_fat"]
    assert p["intervertebral_disc"] > p["vertebral_body"]
    smoothing = {spec.name: spec.smoothing_mm for spec in default_map}
    assert all(smoothing[n] <= 1.0 for n in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage",
                                              "meniscus"))
    assert all(3.0 <= smoothing[n] <= 4.0 for n in ("femur", "tibia", "patella") + muscles)


def test_lookups(default_map: LabelMap) -> None:
    assert default_map.by_name("meniscus").value == 7
    assert default_map.by_value(14).name == "femoral_cortex"
    assert default_map.by_class_id(16).name == "intervertebral_disc"
    with pytest.raises(KeyError, match="ligament"):
        default_map.by_name("ligament")
    with pytest.raises(KeyError):
        default_map.by_value(99)
    with pytest.raises(KeyError, match="elbow"):
        default_map.for_anatomy("elbow")


def test_anatomy_codes_unknown_name_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="'ligament'.*category"):
        codes.anatomy_codes("ligament")


def _entry(**changes: object) -> dict:
    entry = {"name": "femur", "value": 1, "class_id": 0, "anatomy": "knee", "colour": [230, 220, 170],
             "smoothing_mm": 3.0, "priority": 1, "min_area_mm2": 20}
    entry.update(changes)
    return entry


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "label_map.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document), encoding="utf-8")
    return path


def test_explicit_codes_override_and_allow_unknown_names(tmp_path: Path) -> None:
    ligament = _entry(name="acl", value=2, class_id=1,
                      category={"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
                      type={"scheme": "SCT", "value": "52082005", "meaning": "Ligament"})
    label_map = load_label_map(_write(tmp_path, {"labels": [_entry(), ligament]}))
    assert label_map.by_name("acl").property_type.value == "52082005"
    assert label_map.by_name("femur").property_type.meaning == "Femur"


def _broken_meniscus() -> dict:
    entry = _entry(name="meniscus", value=7, class_id=6)
    entry["colur"] = entry.pop("colour")
    return entry


def _without(key: str) -> dict:
    entry = _entry()
    del entry[key]
    return entry


INVALID = [
    pytest.param([_entry(), _entry(name="tibia", value=2, class_id=1), _entry(name="patella", value=3, class_id=2),
                  _broken_meniscus()],
                 ["label_map.yaml: labels[3] (meniscus): unknown key 'colur'"], id="unknown-key"),
    pytest.param([_without("priority")], ["labels[0] (femur)", "missing required key 'priority'"], id="missing-key"),
    pytest.param([_entry(value="one")], ["labels[0] (femur)", "'value'", "integer"], id="value-not-int"),
    pytest.param([_entry(value=True)], ["'value'", "integer"], id="value-bool"),
    pytest.param([_entry(value=0)], ["'value'", "1..255"], id="value-zero"),
    pytest.param([_entry(value=256)], ["'value'", "1..255"], id="value-too-big"),
    pytest.param([_entry(class_id=-1)], ["'class_id'"], id="class-id-negative"),
    pytest.param([_entry(), _entry(name="tibia", class_id=1)],
                 ["labels[1] (tibia)", "duplicate value 1", "labels[0] (femur)"], id="duplicate-value"),
    pytest.param([_entry(), _entry(name="tibia", value=2)],
                 ["labels[1] (tibia)", "duplicate class_id 0"], id="duplicate-class-id"),
    pytest.param([_entry(), _entry(value=2, class_id=1)], ["labels[1] (femur)", "duplicate name"],
                 id="duplicate-name"),
    pytest.param([_entry(colour=[1, 2])], ["'colour'", "3 integers 0..255"], id="colour-two-values"),
    pytest.param([_entry(colour=[1, 2, 300])], ["'colour'"], id="colour-out-of-range"),
    pytest.param([_entry(colour=[1.5, 2, 3])], ["'colour'"], id="colour-float"),
    pytest.param([_entry(colour="red")], ["'colour'"], id="colour-string"),
    pytest.param([_entry(smoothing_mm=-1)], ["'smoothing_mm'", ">= 0"], id="smoothing-negative"),
    pytest.param([_entry(min_area_mm2="big")], ["'min_area_mm2'"], id="min-area-string"),
    pytest.param([_entry(priority=1.5)], ["'priority'", "integer"], id="priority-float"),
    pytest.param([_entry(anatomy="")], ["'anatomy'"], id="anatomy-empty"),
    pytest.param([_entry(name="Femur Bone")], ["'name'"], id="name-not-identifier"),
    pytest.param([_entry(name="acl")], ["labels[0] (acl)", "unknown label name 'acl'", "'category'"],
                 id="unknown-name-without-codes"),
    pytest.param([_entry(name="acl", category={"scheme": "SCT", "value": "91723000",
                                               "meaning": "Anatomical Structure"})],
                 ["labels[0] (acl)", "'type' is required"], id="unknown-name-without-type"),
    pytest.param([_entry(type={"scheme": "SCT", "value": "71341001"})], ["'type'", "meaning"],
                 id="code-without-meaning"),
    pytest.param([_entry(category={"scheme": "SCT", "value": 91723000, "meaning": "Anatomical Structure"})],
                 ["'category'", "'value'"], id="code-value-not-string"),
    pytest.param([_entry(interior_of="cortex")], ["labels[0] (femur)", "'interior_of' must name another label"],
                 id="interior-of-unknown-label"),
    pytest.param([_entry(interior_of="femur")], ["'interior_of' must name another label"], id="interior-of-itself"),
    pytest.param([_entry(interior_of=3)], ["'interior_of' must be a label name"], id="interior-of-not-name"),
]


@pytest.mark.parametrize(("entries", "fragments"), INVALID)
def test_invalid_entries_raise_value_error_naming_the_key(tmp_path: Path, entries: list, fragments: list) -> None:
    path = _write(tmp_path, {"labels": copy.deepcopy(entries)})
    with pytest.raises(ValueError) as caught:
        load_label_map(path)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("document", "fragment"), [
    pytest.param({"labels": [_entry()], "version": 2}, "unknown top-level key 'version'", id="top-level-key"),
    pytest.param({"labels": []}, "'labels' must be a non-empty list", id="no-labels"),
    pytest.param({"label": [_entry()]}, "unknown top-level key 'label'", id="misspelt-labels"),
    pytest.param([_entry()], "expected a mapping with the key 'labels'", id="bare-list"),
    pytest.param({"labels": ["femur"]}, "labels[0]: expected a mapping", id="entry-not-mapping"),
    pytest.param("labels: [name: femur", "not valid YAML", id="yaml-syntax"),
])
def test_invalid_documents_raise_value_error(tmp_path: Path, document: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        load_label_map(_write(tmp_path, document))
    assert fragment in str(caught.value)
    assert str(caught.value).startswith("label_map.yaml: ")


def test_a_label_built_in_code_is_checked_like_one_read_from_yaml(default_map: LabelMap) -> None:
    femur = default_map.by_name("femur")
    fields = {name: getattr(femur, name) for name in femur.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"key 'value' must be in 1\.\.255, got 300"):
        LabelSpec(**{**fields, "value": 300})
    with pytest.raises(ValueError, match="key 'colour' must be 3 integers"):
        LabelSpec(**{**fields, "colour": (1, 2)})
    assert LabelSpec(**{**fields, "smoothing_mm": 3}).smoothing_mm == 3.0
